"""DVC stage `register`: register the best architecture and run the promotion gate."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("register")  # params.yaml → medimg.register.run
