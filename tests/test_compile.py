"""torch.compile as a setting: compile-clean (no graph breaks, no recompiles between train
and val), regional compile sharing code between blocks, and checkpoints without prefixes."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from swin_lightning.models import SwinTransformer, compile_network
from swin_lightning.models.swin import SwinBlock
from tests.conftest import TINY_DEMO, run_cli

# Two stages with shifted windows (16x16, 8x8; window 4), drop path on.
NET = {"img_size": 32, "patch_size": 2, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
       "window_size": 4, "num_classes": 5, "drop_path_rate": 0.2}  # fmt: skip


def train_val_train_val(net, x):
    """Compiled graphs after each phase: train step, val step, train step, val step."""
    graphs = []
    for train in (True, False, True, False):
        net.train(train)
        with torch.set_grad_enabled(train):
            out = net(x)
            if train:
                out.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
@pytest.mark.parametrize("how", ["full", "regional"])
def test_compile_clean_across_train_and_val(how, mixer, dynamo):
    torch.manual_seed(0)
    extra = {"mixer": "mlp", "pos_embed": "none"} if mixer == "mlp" else {}
    net = SwinTransformer(**NET, **extra)
    keys = list(net.state_dict())
    compile_network(net, how, backend="eager")  # dynamo's tracing, without inductor's codegen
    graphs = train_val_train_val(net, torch.randn(4, 3, 32, 32))
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["frames"]["ok"] == dynamo["frames"]["total"]  # nothing fell back to eager
    # Train and val compile once each; going back and forth compiles nothing more.
    assert graphs[2:] == [graphs[1], graphs[1]] and graphs[0] < graphs[1]
    if how == "full":
        assert graphs == [1, 2, 2, 2]
    else:  # one graph per distinct block shape and mode, shared by the blocks of that shape
        blocks = [m for m in net.modules() if isinstance(m, SwinBlock)]
        kinds = {(b.input_resolution, b.window_size, b.shift_size) for b in blocks}
        assert len(blocks) == 4 and len(kinds) == 4 and graphs[-1] == 2 * len(kinds)
    assert list(net.state_dict()) == keys  # compiled in place: no _orig_mod. prefix


def test_stochastic_depth_rates_do_not_recompile(dynamo):
    # Blocks of one shape but different drop-path rates share one compiled graph.
    blocks = [SwinBlock(8, 2, (8, 8), 4, shift=False, drop_path=p) for p in (0.1, 0.2, 0.3)]
    x = torch.randn(2, 8, 8, 8)
    for block in blocks:
        block.compile(backend="eager")
        block(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_inductor_matches_eager(dynamo):
    torch.manual_seed(0)
    eager = SwinTransformer(**NET).eval()
    compiled = SwinTransformer(**NET).eval()
    compiled.load_state_dict(eager.state_dict())
    compile_network(compiled, "regional")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-4)


def test_fit_with_compile_saves_plain_keys(in_tmp, dynamo):
    cli = run_cli("fit", *TINY_DEMO, "--trainer.max_epochs=1", "--model.compile=full",
                  "--model.compile_backend=eager")  # fmt: skip
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    ckpt = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and not [k for k in keys if "_orig_mod" in k]
    plain = run_cli(*TINY_DEMO, run=False).model  # the same model, compile off
    assert keys == set(plain.state_dict())
    plain.load_state_dict(ckpt["state_dict"])


def test_bad_compile_setting_names_the_choices(in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", *TINY_DEMO, "--model.compile=fast")
    err = capsys.readouterr().err
    assert "compile" in err and "regional" in err
