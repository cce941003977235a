"""DVC stage `validate`: manifest + Great Expectations checks on the raw archive."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("validate")  # params.yaml → medimg.validate.run
