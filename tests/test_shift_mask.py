"""The shifted-window attention mask, checked by what each output token can see."""

import itertools

import pytest
import torch
from torch.autograd.functional import jacobian

from swin_lightning.models.swin import SwinBlock
from swin_lightning.models.windows import shift_attention_mask

H = W = 8
WINDOW = 4


def dependency(block: SwinBlock) -> torch.Tensor:
    """(H*W, H*W) boolean: does the attention output at token p depend on input token q?"""
    torch.manual_seed(0)
    x = torch.randn(1, H, W, 8, dtype=torch.float64)
    jac = jacobian(block._attention, x)  # (1, H, W, C, 1, H, W, C)
    strength = jac.abs().sum(dim=(0, 3, 4, 7)).reshape(H * W, H * W)
    return strength > 1e-20


def expected_dependency(shift: int) -> torch.Tensor:
    """From first principles: same (shifted) window and not wrapped around the image border."""
    coords = [(i, j) for i in range(H) for j in range(W)]
    out = torch.zeros(H * W, H * W, dtype=torch.bool)
    for p, (pi, pj) in enumerate(coords):
        for q, (qi, qj) in enumerate(coords):
            same_window = ((pi - shift) % H) // WINDOW == ((qi - shift) % H) // WINDOW and (
                (pj - shift) % W
            ) // WINDOW == ((qj - shift) % W) // WINDOW
            neighbours = abs(pi - qi) < WINDOW and abs(pj - qj) < WINDOW
            out[p, q] = same_window and neighbours
    return out


def make_block(shift: bool) -> SwinBlock:
    torch.manual_seed(0)
    return SwinBlock(8, 2, (H, W), WINDOW, shift=shift).double().eval()


def test_shifted_window_never_mixes_source_regions():
    block = make_block(shift=True)
    assert block.shift_size == (2, 2)
    dep = dependency(block)
    assert torch.equal(dep, expected_dependency(shift=2))
    # A concrete pair: (7, 7) and (0, 0) share a window after the cyclic shift, but they are
    # opposite corners of the image, so neither may attend to the other.
    assert not dep[7 * W + 7, 0] and not dep[0, 7 * W + 7]
    assert dep[7 * W + 7, 6 * W + 6]


def test_no_shift_uses_no_mask_and_plain_windows():
    block = make_block(shift=False)
    assert block.attn_mask is None and block.shift_mask(H, W, torch.device("cpu")) is None
    assert torch.equal(dependency(block), expected_dependency(shift=0))


def test_mask_values():
    mask = shift_attention_mask(H, W, (WINDOW, WINDOW), (2, 2))
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds no wrapped tokens
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert torch.equal(mask, mask.transpose(1, 2))


def test_attention_weights_across_regions_are_zero():
    block = make_block(shift=True)
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    probs = block.attention_probs(x)  # (B, nW, heads, N, N)
    mask = block.shift_mask(H, W, x.device)  # (nW, N, N)
    across = (mask != 0)[None, :, None].expand_as(probs)
    assert across.any()
    assert probs[across].max() < 1e-30  # exp(-100) relative to in-region weights
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    # The explicit weights agree with the fused SDPA path the forward pass uses.
    windows, _, mask = block.to_windows(block.norm1(x))
    v = block.attn.qkv(windows).view(*windows.shape[:3], 3, 2, 4)[..., 2, :, :]
    manual = (probs @ v.transpose(2, 3)).transpose(2, 3).reshape(windows.shape)
    torch.testing.assert_close(block.attn.proj(manual), block.attn(windows, mask))


def test_window_figures_titles_fit_and_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from swin_lightning.models import create_model
    from swin_lightning.visualize import plot_attention_mask, plot_windows

    blocks = list(create_model("swin_t").layers[0].blocks)
    for fig in (plot_windows(blocks[0], blocks[1]), plot_attention_mask(blocks[1])):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
        assert boxes
        for box in boxes:
            assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
        for a, b in itertools.pairwise(boxes):
            assert a.x1 < b.x0, "titles overlap"


def test_attention_map_of_a_query_covers_its_shifted_window():
    # visualize builds its maps on the block's own partition (to_windows): a query's map sums
    # to one over the tokens of its window after padding and the cyclic shift, zero elsewhere.
    from swin_lightning.models import SwinTransformer
    from swin_lightning.visualize import _query_map, _token_windows

    torch.manual_seed(0)
    net = SwinTransformer(img_size=(40, 56), patch_size=4, embed_dim=16, depths=(2,),
                          num_heads=(2,), window_size=4, num_classes=3).eval()  # fmt: skip
    x = torch.randn(1, 10, 14, 16)  # 10x14 tokens: padded to 12x16 for windows of 4
    shifted = net.layers[0].blocks[1]
    windows = _token_windows(shifted, 10, 14)
    assert windows.shape == (12, 16) and sorted(windows[windows >= 0].tolist()) == list(range(140))
    probs = shifted.attention_probs(x)[0]
    # The top-left token: the cyclic shift puts it in the last window, beside padding.
    corner = _query_map(shifted, probs, (0, 0), 10, 14)
    assert corner.sum().item() == pytest.approx(1.0, abs=1e-5)
    (row,) = [w for w in windows if (w == 0).any()]
    inside = torch.zeros(140, dtype=torch.bool)
    inside[row[row >= 0]] = True
    assert (corner.flatten()[~inside] == 0).all() and (corner.flatten()[inside] > 0).all()
    assert inside.view(10, 14).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert (row < 0).sum() == 12  # the other 12 slots of that window are padding
