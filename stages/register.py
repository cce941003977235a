"""DVC stage `register`: register the best architecture and run the promotion gate."""

from medimg.cli import stage_main
from medimg.register import run

if __name__ == "__main__":
    stage_main(run)
