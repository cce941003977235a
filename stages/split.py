"""DVC stage `split`: split the validated manifest by patient into TFRecord shards."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("split")  # params.yaml → medimg.split.run
