"""``python -m swin_lightning {fit,validate,test,predict,ablate,bench}``."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ablate":
        from swin_lightning.ablate import main as ablate

        sys.exit(ablate(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        from swin_lightning.bench import main as bench

        sys.exit(bench(sys.argv[2:]))
    from swin_lightning.cli import cli_main

    cli_main()


if __name__ == "__main__":
    main()
