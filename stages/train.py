"""DVC stage `train`: train one architecture (the matrix item) and track it in MLflow."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("train")  # params.yaml → medimg.train.run
