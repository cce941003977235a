"""DVC stage `evaluate`: test-split metrics, plots and int8 edge figures of one architecture."""

from medimg.cli import stage_main
from medimg.evaluate import run

if __name__ == "__main__":
    stage_main(run)
