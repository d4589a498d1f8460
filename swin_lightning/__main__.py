"""``python -m swin_lightning {fit,validate,test,predict,ablate}``."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ablate":
        from swin_lightning.ablate import main as ablate

        sys.exit(ablate(sys.argv[2:]))
    from swin_lightning.cli import cli_main

    cli_main()


if __name__ == "__main__":
    main()
