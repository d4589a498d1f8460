"""``python -m swin_lightning export``: a trained checkpoint as ONNX, a ``torch.export``
program (``.pt2``), or timm's, Hugging Face's or torchvision's own files, checked against the
PyTorch model on the spot.

    python -m swin_lightning export --ckpt_path logs/demo/version_0/checkpoints/last.ckpt \\
        --format onnx --out demo.onnx
    python -m swin_lightning export --ckpt_path ... --format timm --out demo_timm/

The network is the one the checkpoint holds (:mod:`swin_lightning.models.net_spec`); an
older checkpoint's is rebuilt from the run's ``config.yaml`` (beside ``checkpoints/``;
``--config`` for another, which also overrides the checkpoint's), with the checkpoint's
weights (the EMA average when the run kept one). The batch dimension is dynamic; height and
width are those of ``--image_size`` (default: the run's data). ONNX is checked in onnxruntime (the ``export`` extra); ``timm``, ``hf`` and
``torchvision`` write a folder that the library itself reads back for the check
(:mod:`swin_lightning.library_files`; ``hf`` needs the ``hf`` extra).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

from swin_lightning.library_files import LibraryMismatch, write_library_files
from swin_lightning.models import SwinTransformer
from swin_lightning.models.library_export import NotExpressible
from swin_lightning.models.net_spec import DATA_KEY, NET_KEY
from swin_lightning.run_network import (
    ExportError,
    build_network,
    check_weights,
    data_from_config,
    network_of_checkpoint,
    run_config,
)
from swin_lightning.storage import CheckpointError, WriteError, load_checkpoint, write_bytes

__all__ = ["ExportError", "build_network", "check_weights", "export", "main", "run_config"]

FILE_FORMATS = ("onnx", "pt2")
FOLDER_FORMATS = ("timm", "hf", "torchvision")  # the libraries' own files
FORMATS = FILE_FORMATS + FOLDER_FORMATS
CHECK_BATCHES = (1, 3)


def export(net: SwinTransformer, fmt: str, out: Path) -> float:
    """Write ``net`` as ``fmt`` to ``out`` (batch dimension dynamic) and return the largest
    absolute difference to the PyTorch logits over random batches of 1 and 3 images."""
    h, w = net.img_size
    example = torch.randn(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"x": {0: batch}}
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(net, (example,), dynamic_shapes=dynamic)
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            write_bytes(out, buffer.getvalue())
            run = torch.export.load(out).module()  # the file written, read back once
        else:
            try:
                import onnxruntime
            except ImportError as err:
                raise ExportError(
                    "checking an ONNX export needs onnxruntime: pip install 'swin_lightning[export]'"
                ) from err
            program = torch.onnx.export(net, (example,), dynamo=True, dynamic_shapes=dynamic,
                                        input_names=["images"], output_names=["logits"],
                                        verbose=False)  # fmt: skip
            write_bytes(out, program.model_proto.SerializeToString())
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])

            def run(x):
                return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

        diff = 0.0
        for n in CHECK_BATCHES:
            x = torch.randn(n, 3, h, w)
            diff = max(diff, (run(x) - net(x)).abs().max().item())
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swin_lightning export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of a swin_lightning run")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", required=True,
                        help="file to write (.onnx, .pt2) or folder (timm, hf, torchvision)")  # fmt: skip
    parser.add_argument("--config", default=None, help="run config (default: the run's)")
    parser.add_argument("--image_size", type=int, nargs="+", default=None, metavar="H [W]",
                        help="input height and width (default: the run's data.image_size)")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest logit difference to PyTorch accepted")  # fmt: skip
    args = parser.parse_args(argv)
    if args.image_size is not None and len(args.image_size) > 2:
        parser.error(f"--image_size takes H or H W, not {len(args.image_size)} numbers")
    ckpt = Path(args.ckpt_path)
    try:
        checkpoint = load_checkpoint(ckpt)
        data = checkpoint.get(DATA_KEY)
        if NET_KEY in checkpoint and args.config is None:  # self-contained: no config needed
            net = network_of_checkpoint(checkpoint, args.image_size)
        else:
            config = run_config(ckpt, args.config)
            net = build_network(config, checkpoint["state_dict"], args.image_size)
            if data is None and args.format in FOLDER_FORMATS:
                data = data_from_config(config)
        if args.format in FOLDER_FORMATS:
            diff = write_library_files(net, args.format, Path(args.out), data, args.tolerance)
        else:
            diff = export(net, args.format, Path(args.out))
    except (ExportError, CheckpointError, FileNotFoundError, WriteError, ImportError,
            NotExpressible, LibraryMismatch) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:  # the network rejects the size, or a bad config
        print(f"error: cannot build or export the network: {str(err).splitlines()[0]}",
              file=sys.stderr)  # fmt: skip
        return 1
    h, w = net.img_size
    verdict = "ok" if diff <= args.tolerance else f"above --tolerance {args.tolerance:g}"
    if args.format in FOLDER_FORMATS:  # (write_library_files refuses a folder that differs)
        print(f"wrote {args.out}/ ({args.format}'s own files, input (batch, 3, {h}, {w})); read "
              f"back with {args.format}: max |logits - ours| over batches {CHECK_BATCHES}: "
              f"{diff:.2e} (ok)")  # fmt: skip
        return 0
    print(f"wrote {args.out} ({args.format}, input (batch, 3, {h}, {w}), batch dynamic); max "
          f"|logits - PyTorch| over batches {CHECK_BATCHES}: {diff:.2e} ({verdict})")  # fmt: skip
    if diff > args.tolerance:
        print(f"error: the export differs from PyTorch by {diff:.2e}", file=sys.stderr)
        return 1
    return 0
