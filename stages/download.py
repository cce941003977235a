"""DVC stage `download`: put the dataset archive in place (synthetic, url or local)."""

from medimg.cli import stage_main

if __name__ == "__main__":
    stage_main("download")  # params.yaml → medimg.download.run
