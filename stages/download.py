"""DVC stage `download`: put the dataset archive in place (synthetic, url or local)."""

from medimg.cli import stage_main
from medimg.download import run

if __name__ == "__main__":
    stage_main(run)
