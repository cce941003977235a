"""DVC stage `evaluate`: test-split metrics, plots and int8 edge figures of one architecture."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("evaluate")  # params.yaml → medimg.evaluate.run
