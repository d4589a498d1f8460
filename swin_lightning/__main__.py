"""``python -m swin_lightning {fit,validate,test,predict,ablate,tune,bench,pack,export,analyze,verify}``."""

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "ablate":
        from swin_lightning.ablate import main as ablate

        sys.exit(ablate(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "tune":
        from swin_lightning.tune import main as tune

        sys.exit(tune(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "pack":
        from swin_lightning.pack import main as pack

        sys.exit(pack(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from swin_lightning.export import main as export

        sys.exit(export(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "analyze":
        from swin_lightning.analyze import main as analyze

        sys.exit(analyze(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "verify":
        from swin_lightning.verify import main as verify

        sys.exit(verify(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        from swin_lightning.bench import main as bench
        from swin_lightning.storage import WriteError

        try:
            sys.exit(bench(sys.argv[2:]))
        except WriteError as err:  # the figures could not be saved: one line, not a traceback
            sys.exit(f"error: {err}")
    from swin_lightning.cli import cli_main

    cli_main()


if __name__ == "__main__":
    main()
