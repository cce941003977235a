"""DVC stage `validate`: manifest + Great Expectations checks on the raw archive."""

from medimg.cli import stage_main
from medimg.validate import run

if __name__ == "__main__":
    stage_main(run)
