"""The model on its tiny configuration (same code as vit_b), its checkpoints, and its axis convention."""

import re

import pytest
import torch
import torch.nn.functional as F

from lib.model import (
    CONFIGS, CheckpointError, Clicks, Sam3DPredictor, build_sam3d, create_model, freeze_backbone, save_sam3d, trainable_names,
)
from lib.model.image_encoder import (
    Block3d,
    relative_position_table,
    shifted_window_regions,
    window_layout,
    window_partition,
)
from lib.model import conv
from lib.model.build import INITIALISATION_SEED
from lib.model.checkpoints import SAM3D_ONLY
from lib.model.prompt_encoder import PromptEncoder3d
from lib.model.predictor import exclude_background

TINY = CONFIGS["tiny"]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model(TINY).eval()


def perturb(model, scale=0.05, sam3d_prompts=False):
    """Move every parameter off its initial value so that a wrong mapping cannot hide behind zeros or ones.
    sam3d's own prompts (absent from the authors' model, zero until trained) stay unless ``sam3d_prompts``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if sam3d_prompts or not name.startswith(SAM3D_ONLY):
                p.add_(scale * torch.randn_like(p))
    return model


def test_predict_crop_shapes_and_range(tiny):
    crop = torch.randn(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    prob = Sam3DPredictor(tiny).predict_crop(crop, torch.tensor([[3, 17, 29]]))
    assert prob.shape == crop.shape and prob.dtype == torch.float32
    assert 0 <= prob.min() and prob.max() <= 1


def test_encoder_features_are_four_maps_on_the_token_grid(tiny):
    g = TINY.token_grid
    features = tiny.image_encoder(torch.randn(2, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    assert [tuple(f.shape) for f in features] == [(2, TINY.out_chans, g, g, g)] * 4


def test_predict_crop_rejects_points_outside_the_crop(tiny):
    crop = torch.zeros(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    with pytest.raises(ValueError, match="inside the crop"):
        Sam3DPredictor(tiny).predict_crop(crop, torch.tensor([[0, 0, TINY.crop_size]]))


def test_visual_sampler_reads_the_feature_at_the_click_in_d_h_w_order():
    g, crop = 8, 32
    coords = torch.stack(torch.meshgrid(*[torch.arange(g, dtype=torch.float32)] * 3, indexing="ij"))
    features = coords[None]  # channel c holds the token index along axis c = (d, h, w)
    click = torch.tensor([[[2.0, 17.0, 29.0]]])
    sampled = PromptEncoder3d.sample(features, click, (crop,) * 3)[0, 0]
    # Voxel p of the crop sits at token coordinate (p + 0.5) / 4 - 0.5 (clamped to the grid).
    expected = ((click[0, 0] + 0.5) / (crop / g) - 0.5).clamp(0, g - 1)
    assert torch.allclose(sampled, expected, atol=1e-5)


def test_chunked_patch_embedding_equals_upsample_then_rgb_slices_then_slice_embedding(tiny):
    perturb(tiny)
    embed = tiny.image_encoder.patch_embed
    crop = torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size)
    # The authors' order of operations: upsample, grey -> RGB, SAM's 2D embedding per slice, depthwise merge.
    up = F.interpolate(crop, scale_factor=TINY.upsample, mode="trilinear").repeat(1, 3, 1, 1, 1)
    slices = up[0].transpose(0, 1)  # (slices, 3, H, W)
    per_slice = F.conv2d(slices, embed.proj.weight, embed.proj.bias, stride=TINY.patch_size)
    expected = embed.slice_embed(per_slice.permute(1, 0, 2, 3)[None]).movedim(1, -1)
    assert torch.allclose(embed(crop), expected, atol=1e-4)


@pytest.mark.parametrize("grid, shift", [((8, 8, 8), 0), ((8, 8, 8), 2), ((5, 6, 7), 0)])
def test_window_layout_gathers_rolled_windows_and_scatters_back(grid, shift):
    x = torch.randn(2, *grid, 3)
    layout = window_layout(grid, 4, shift, x.device)
    rolled = torch.roll(x, shifts=(-shift,) * 3, dims=(1, 2, 3)) if shift else x
    expected, _ = window_partition(rolled, 4)  # roll, zero-pad, partition: the paper's way
    tokens = torch.cat([x.reshape(2, -1, 3), x.new_zeros(2, 1, 3)], dim=1)
    assert torch.equal(tokens[:, layout.gather].view(expected.shape), expected)
    assert torch.equal(tokens[:, layout.gather][:, layout.scatter], x.reshape(2, -1, 3))
    assert layout.padded == (grid != (8, 8, 8))


def test_shifted_window_regions_label_what_the_roll_wrapped():
    regions = shifted_window_regions((8, 8, 8), window=4, shift=2, device=torch.device("cpu"))
    assert regions.shape == (8, 64)
    assert (regions[0] == regions[0, 0]).all()  # the first window lies wholly inside one region
    assert len(regions[-1].unique()) == 8 and (regions[-1].bincount(minlength=27) % 8 == 0).all()  # 8 regions of 8


def explicit_window_attention(attn, windows, shift_mask):
    """The paper's attention, written out: softmax(q.k * scale + decomposed relative positions + mask) v."""
    b, d, h, w, c = windows.shape
    n, heads = d * h * w, attn.num_heads
    q, k, v = attn.qkv(windows).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    grid_q = q.reshape(b, heads, d, h, w, -1)
    rel_d = torch.einsum("bndhwc,dkc->bndhwk", grid_q, relative_position_table(d, attn.rel_pos_d))
    rel_h = torch.einsum("bndhwc,hkc->bndhwk", grid_q, relative_position_table(h, attn.rel_pos_h))
    rel_w = torch.einsum("bndhwc,wkc->bndhwk", grid_q, relative_position_table(w, attn.rel_pos_w))
    bias = rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    logits = logits + attn.rel_pos_scale * bias.reshape(b, heads, n, n)
    if shift_mask is not None:
        logits = (logits.view(-1, shift_mask.shape[0], heads, n, n) + shift_mask[None, :, None]).view(b, heads, n, n)
    out = logits.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, d, h, w, c))


def paper_shift_mask(grid, window, shift):
    """The paper's mask: in the rolled grid, each axis splits into the bands [0, G - window), [G - window,
    G - shift) and [G - shift, G); tokens of different band triples get -100."""
    axes = [torch.bucketize(torch.arange(g), torch.tensor([g - window, g - shift]), right=True) for g in grid]
    bands = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    label = (bands * torch.tensor([9, 3, 1])).sum(-1)
    windows = window_partition(label[None, ..., None].float(), window)[0].view(-1, window**3)
    return torch.where(windows[:, :, None] == windows[:, None, :], 0.0, -100.0)


@pytest.mark.parametrize("shift", [0, 2])
def test_fused_window_attention_equals_the_explicit_attention(shift):
    torch.manual_seed(0)
    block = perturb(Block3d(32, 2, 4.0, window=4, shift=shift, rel_pos_size=7), 0.3)
    x = torch.randn(2, 8, 8, 8, 32)
    if shift:
        x = torch.roll(x, shifts=(-shift,) * 3, dims=(1, 2, 3))
    windows, _ = window_partition(x, 4)
    regions = shifted_window_regions((8, 8, 8), 4, shift, x.device) if shift else None
    mask = paper_shift_mask((8, 8, 8), 4, shift) if shift else None
    with torch.no_grad():
        fused, explicit = block.attn(windows, regions), explicit_window_attention(block.attn, windows, mask)
    assert torch.allclose(fused, explicit, atol=1e-4), (fused - explicit).abs().max()


@pytest.mark.parametrize(
    "shape, kernel, padding, dilation",
    [
        ((1, 6, 32, 32, 32), 3, 1, 1),  # the refiner's first convolution over a whole tiny crop
        ((1, 8, 31, 20, 17), 3, 2, 2),  # its dilated one on a correction round's odd-sized box
        ((1, 8, 9, 12, 10), 3, 0, 1),  # no padding: the output is shorter than the input
        ((1, 24, 16, 16, 16), 3, (1, 0, 1), 1),  # the decoder's classifier; padding per axis
        ((1, 3, 4, 5, 6), (2, 3, 1), 0, (1, 2, 1)),  # an even kernel, an anisotropic one
    ],
)
def test_a_convolution_of_one_crop_split_along_d_equals_pytorchs_in_values_and_gradients(shape, kernel, padding, dilation):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    layer = conv.Conv3d(shape[1], 5, kernel, padding=padding, dilation=dilation)
    reference = F.conv3d(x, layer.weight, layer.bias, padding=padding, dilation=dilation)
    assert conv.splits(x, layer.weight)
    out = layer(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    cotangent = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x, layer.weight, layer.bias], cotangent)
    got = torch.autograd.grad(out, [x, layer.weight, layer.bias], cotangent)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3)


def test_convolutions_pytorch_sends_to_onednn_are_left_to_it():
    weight = torch.zeros(4, 8, 3, 3, 3)
    assert not conv.splits(torch.zeros(2, 8, 16, 16, 16), weight)  # a batch: oneDNN already
    assert not conv.splits(torch.zeros(1, 32, 32, 32, 32), weight)  # over ATen's size: oneDNN already
    assert not conv.splits(torch.zeros(1, 8, 16, 16, 16), torch.zeros(4, 8, 1, 1, 1))  # 1x1x1: reference is faster
    assert not conv.splits(torch.zeros(1, 8, 16, 16, 16, dtype=torch.bfloat16), weight.bfloat16())
    with pytest.raises(ValueError, match="stride 1"):
        conv.Conv3d(8, 8, 3, stride=2)


def test_background_never_adds_foreground_and_removes_only_on_its_side():
    fg, bg = torch.randn(1000), torch.randn(1000)  # log-odds
    nearer_background = torch.rand(1000) < 0.5
    combined = exclude_background(fg, bg, nearer_background)
    assert (combined <= fg).all()
    kept = (bg <= fg) | ~nearer_background
    assert torch.equal(combined[kept], fg[kept])
    assert (combined[(bg > 0) & (bg > fg) & nearer_background] < 0).all()


def crop_clicks(points, labels=None):
    return Clicks.from_points(points, labels, "crop")


def test_background_clicks_only_remove(tiny):
    perturb(tiny, 0.2)
    crop = torch.randn(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    encoding = tiny.encode(crop[None, None])
    fg_only = Sam3DPredictor(tiny).foreground_probability(encoding, crop_clicks([[10, 10, 10]]))
    both = Sam3DPredictor(tiny).foreground_probability(encoding, crop_clicks([[10, 10, 10], [25, 5, 20]], [1, 0]))
    assert (both <= fg_only).all()
    nothing = Sam3DPredictor(tiny).foreground_probability(encoding, crop_clicks([[25, 5, 20]], [0]))
    assert (nothing == 0).all()


def test_the_background_rule_never_removes_what_is_nearer_the_foreground_click(tiny):
    """A background click on a leak that the model takes for the lesion itself (both answers the same object)
    removes the leak's side only: voxels nearer the foreground click stay as the foreground answer had them."""
    perturb(tiny, 0.2)
    encoding = tiny.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    points, labels = torch.tensor([[8, 16, 16], [24, 16, 16]]), torch.tensor([1, 0])
    fg_only = Sam3DPredictor(tiny).click_logits(encoding, points[:1], labels[:1])
    both = Sam3DPredictor(tiny).click_logits(encoding, points, labels)
    assert torch.equal(both[:16], fg_only[:16])  # d < 16: nearer the foreground click at d = 8


def test_sam3d_prompts_start_at_zero_so_an_authors_model_answers_as_theirs():
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    encoding = model.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    points = torch.tensor([[5, 9, 30], [20, 20, 3]])
    plain = Sam3DPredictor(model).click_logits(encoding, points, torch.tensor([1, 1]))
    with_previous = Sam3DPredictor(model).click_logits(encoding, points, torch.tensor([1, 1]), previous=torch.randn((TINY.crop_size,) * 3))
    assert torch.equal(plain, with_previous)


def test_an_untrained_refiner_is_skipped_when_serving_and_still_learns_in_training():
    """An authors' checkpoint's refiner adds zeros: serving skips it (half a second a click on the paper
    configuration's CPU) and answers the same; with gradients on, it runs, so that fine-tuning teaches it."""
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    runs = []
    model.refiner.net.register_forward_hook(lambda *_: runs.append(1))
    encoding = model.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    points, labels = torch.tensor([[5, 9, 30], [20, 20, 3]]), torch.tensor([1, 1])
    with torch.no_grad():
        served = Sam3DPredictor(model).click_logits(encoding, points, labels)
    assert runs == []
    trained = Sam3DPredictor(model).click_logits(encoding, points, labels)
    assert runs == [1] and torch.equal(served, trained.detach())
    trained.sigmoid().mean().backward()
    assert model.refiner.net[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.refiner.net[-1].bias.fill_(0.1)  # a trained refiner runs when serving
        Sam3DPredictor(model).click_logits(encoding, points, labels)
    assert runs == [1, 1]


class CountingMemo(dict):
    def __init__(self):
        super().__init__()
        self.computed = 0

    def get(self, points, labels):
        return super().get((str(points.tolist()), str(labels.tolist())))

    def put(self, points, labels, logits):
        self.computed += 1
        self[(str(points.tolist()), str(labels.tolist()))] = logits


def test_corrections_answer_in_two_rounds_and_a_refinement_decodes_one(tiny):
    perturb(tiny, 0.2, sam3d_prompts=True)
    tiny = tiny.sharing_weights(correction_trained=True)
    encoding = tiny.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    points, labels = torch.tensor([[8, 16, 16], [24, 16, 16], [12, 10, 20]]), torch.tensor([1, 0, 1])
    fresh = Sam3DPredictor(tiny).correction_logits(encoding, crop_clicks(points, labels))
    # by hand: the first foreground click alone, then every click (foreground first, in the order sent) seeing it
    first = Sam3DPredictor(tiny).click_logits(encoding, points[:1], labels[:1])
    assert torch.equal(fresh, Sam3DPredictor(tiny).click_logits(encoding, points[[0, 2, 1]], labels[[0, 2, 1]], first))
    assert not torch.equal(fresh, first)

    memo = CountingMemo()
    first_two = crop_clicks(points[:2], labels[:2])
    assert torch.equal(Sam3DPredictor(tiny).correction_logits(encoding, first_two, memo), Sam3DPredictor(tiny).correction_logits(encoding, first_two))
    assert memo.computed == 2
    # Two prompts added at once (the foreground click 2 beside the background click 1 already sent): one round.
    assert torch.equal(Sam3DPredictor(tiny).correction_logits(encoding, crop_clicks(points, labels), memo), fresh)
    assert memo.computed == 3  # (fg0) was reused; only (fg0, fg2, bg1) was new
    assert torch.equal(Sam3DPredictor(tiny).correction_logits(encoding, crop_clicks(points, labels), memo), fresh)
    assert memo.computed == 3  # the same request again: nothing decoded


def test_the_rule_reuses_the_foreground_answer_when_a_background_click_is_added(tiny):
    """An authors' checkpoint answers a background click from two one-object answers; in a session the foreground
    one was computed by the request before, so the background click costs one decoder pass, and the answer is the
    one computed afresh."""
    perturb(tiny, 0.2)
    tiny = tiny.sharing_weights(correction_trained=False)
    encoding = tiny.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    decoder_passes = []
    hook = tiny.mask_decoder.register_forward_hook(lambda *_: decoder_passes.append(1))
    try:
        memo = CountingMemo()
        first = crop_clicks([[8, 16, 16]])
        assert torch.equal(Sam3DPredictor(tiny).correction_logits(encoding, first, memo), Sam3DPredictor(tiny).correction_logits(encoding, first))
        decoder_passes.clear()
        with_background = crop_clicks([[8, 16, 16], [24, 16, 16]], [1, 0])
        answer = Sam3DPredictor(tiny).correction_logits(encoding, with_background, memo)
        assert len(decoder_passes) == 1
        assert torch.equal(answer, Sam3DPredictor(tiny).correction_logits(encoding, with_background))  # what no memo gives
        assert len(decoder_passes) == 3
    finally:
        hook.remove()


def test_cached_refinement_equals_full_recompute(tiny):
    perturb(tiny)
    crop = torch.randn(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    points = torch.tensor([[4, 20, 9], [6, 22, 11]])
    encoding = tiny.encode(crop[None, None])
    assert torch.equal(Sam3DPredictor(tiny).foreground_probability(encoding, crop_clicks(points)), Sam3DPredictor(tiny).predict_crop(crop, points))


def test_frozen_and_trainable_parts_follow_the_paper(tiny):
    trainable, total = freeze_backbone(tiny)
    names = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert 0 < trainable < total
    for frozen in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.rel_pos_h",
                   "blocks.0.attn.rel_pos_scale", "blocks.0.mlp.lin1.weight"):
        assert f"image_encoder.{frozen}" not in names
    for trained in ("depth_embed", "patch_embed.slice_embed.weight", "blocks.0.adapter.conv.weight",
                    "blocks.0.norm1.weight", "blocks.0.attn.rel_pos_d", "necks.3.2.weight"):
        assert f"image_encoder.{trained}" in names
    assert all(p.requires_grad for p in tiny.prompt_encoder.parameters())
    assert all(p.requires_grad for p in tiny.mask_decoder.parameters())


# --- checkpoints --------------------------------------------------------------------------------------------


def test_random_segment_anything_vit_b_fills_every_encoder_weight(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    state = sam.state_dict()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)
    del sam

    model = build_sam3d(backbone="vit_b", sam_checkpoint=str(path))
    ours = model.state_dict()
    sam_encoder = {k: v for k, v in state.items() if k.startswith("image_encoder.") and ".neck." not in k}
    assert len(sam_encoder) == 3 + 12 * 14  # patch embedding weight and bias, pos_embed, 14 per block
    for key, tensor in sam_encoder.items():
        assert torch.equal(ours[key], tensor), key
    for i in range(12):
        block = f"image_encoder.blocks.{i}.attn."
        assert torch.equal(ours[block + "rel_pos_d"], 0.5 * (state[block + "rel_pos_h"] + state[block + "rel_pos_w"]))
    info = model.weights_info
    assert info["sam_backbone"] == str(path) and info["adapters"].startswith("untrained")


def test_sam_checkpoint_with_a_wrong_shape_is_refused_naming_the_tensor(tmp_path):
    from segment_anything import sam_model_registry

    state = sam_model_registry["vit_b"]().state_dict()
    state["image_encoder.blocks.3.attn.qkv.weight"] = torch.zeros(10, 10)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.3\.attn\.qkv\.weight"):
        build_sam3d(backbone="vit_b", sam_checkpoint=str(tmp_path / "bad.pth"))


def to_authors_format(model) -> dict:
    """Write our model as the authors' training script saves it: their key names, their (H, W, D) kernels,
    the buffers and unused modules their modules carry, and four prompt-encoder dicts."""

    def theirs(tensor):
        return tensor.permute(0, 1, 3, 4, 2).clone() if tensor.dim() == 5 else tensor.clone()

    encoder, prompt, decoder = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if name.startswith(SAM3D_ONLY):
            continue  # sam3d's own prompts: their model has none
        part, _, rest = name.partition(".")
        if part == "image_encoder":
            rest = rest.replace("patch_embed.slice_embed.", "slice_embed.").replace("necks.", "neck_3d.")
            encoder[rest.replace("attn.rel_pos_scale", "attn.lr")] = theirs(tensor)
        elif part == "prompt_encoder":
            prompt["transformer." + rest] = theirs(tensor)
        else:
            rest = re.sub(r"heads\.(\d)", lambda m: f"mlahead.head{int(m.group(1)) + 2}", rest)
            decoder[rest.replace("classifier.", "cls.")] = theirs(tensor)
    window = TINY.window**3
    for i in range(0, TINY.depth, 2):
        encoder[f"blocks.{i}.attn_mask"] = torch.zeros(8, window, window)
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            prompt[f"transformer.layers.{i}.cross_attn_token_to_image.{proj}.weight"] = torch.zeros(1)
    prompt["positional_encoding_gaussian_matrix"] = torch.randn(3, 128)
    return {"epoch": 3, "encoder_dict": encoder, "decoder_dict": decoder, "feature_dict": [{}, {}, {}, prompt],
            "encoder_opt": {}, "feature_opt": {}, "decoder_opt": {}}


def test_authors_format_round_trips(tiny, tmp_path):
    perturb(tiny)
    path = tmp_path / "last.pth.tar"
    torch.save(to_authors_format(tiny), path)
    loaded = build_sam3d(checkpoint=str(path), backbone="tiny")
    for key, tensor in tiny.state_dict().items():
        if not key.startswith(SAM3D_ONLY):  # theirs has none: left at initialisation (their output is unchanged)
            assert torch.equal(loaded.state_dict()[key], tensor), key
    crop = torch.randn(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    points = torch.tensor([[5, 9, 30]])
    assert torch.equal(Sam3DPredictor(loaded).predict_crop(crop, points), Sam3DPredictor(tiny).predict_crop(crop, points))
    assert "authors' format" in loaded.weights_info["adapters"]


def test_what_trains_is_decided_once_by_whether_the_backbone_is_pretrained(tiny, tmp_path):
    random_backbone = build_sam3d(backbone="tiny")
    assert random_backbone.trained_names == [n for n, _ in random_backbone.named_parameters()]
    assert all(p.requires_grad for p in random_backbone.parameters())
    path = tmp_path / "last.pth.tar"
    torch.save(to_authors_format(tiny), path)
    pretrained = build_sam3d(checkpoint=str(path), backbone="tiny")
    assert pretrained.trained_names == list(trainable_names(pretrained))
    assert [n for n, p in pretrained.named_parameters() if p.requires_grad] == pretrained.trained_names


def test_authors_checkpoint_with_an_unknown_or_missing_key_is_refused(tiny, tmp_path):
    extra = to_authors_format(tiny)
    extra["decoder_dict"]["cls.9.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "extra.pth.tar")
    with pytest.raises(CheckpointError, match="cls.9.weight"):
        build_sam3d(checkpoint=str(tmp_path / "extra.pth.tar"), backbone="tiny")

    missing = to_authors_format(tiny)
    del missing["encoder_dict"]["blocks.1.adapter.linear1.weight"]
    torch.save(missing, tmp_path / "missing.pth.tar")
    with pytest.raises(CheckpointError, match="blocks.1.adapter.linear1.weight"):
        build_sam3d(checkpoint=str(tmp_path / "missing.pth.tar"), backbone="tiny")


def test_our_checkpoint_round_trips_and_names_its_backbone(tiny, tmp_path):
    perturb(tiny)
    path = tmp_path / "sam3d.pt"
    save_sam3d(tiny, str(path), "tiny", trainable_names(tiny))
    loaded = build_sam3d(checkpoint=str(path))
    for name in trainable_names(tiny):
        assert torch.equal(loaded.state_dict()[name], tiny.state_dict()[name]), name
    with pytest.raises(CheckpointError, match="tiny checkpoint"):
        build_sam3d(checkpoint=str(path), backbone="vit_b")


def test_a_checkpoint_from_before_the_refiners_likeness_input_loads_and_answers_as_it_did(tiny, tmp_path):
    """sam3d checkpoints written before the refiner read the foreground clicks' likeness map hold a first
    convolution with one input fewer; they load with a zero weight for it, so their masks do not change."""
    perturb(tiny, 0.2, sam3d_prompts=True)
    tiny = tiny.sharing_weights(correction_trained=True)
    with torch.no_grad():
        tiny.refiner.net[0].weight[:, -1] = 0  # what the older model computed: no likeness input
    path = tmp_path / "older.pt"
    save_sam3d(tiny, str(path), "tiny", trainable_names(tiny))
    older = torch.load(path, weights_only=False)
    older["state_dict"]["refiner.net.0.weight"] = older["state_dict"]["refiner.net.0.weight"][:, :-1].clone()
    torch.save(older, path)

    loaded = build_sam3d(checkpoint=str(path)).eval()
    encoding = tiny.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))
    clicks = crop_clicks([[8, 16, 16], [24, 16, 16], [12, 10, 20]], [1, 0, 1])
    assert loaded.correction_trained
    assert torch.equal(Sam3DPredictor(loaded).foreground_probability(encoding, clicks), Sam3DPredictor(tiny).foreground_probability(encoding, clicks))


def test_the_likeness_map_marks_voxels_that_look_like_a_foreground_click_near_it():
    """A correction click on a missed part says what the lesion looks like there; the map is near 1 where a voxel
    looks alike and lies near the click, near 0 where it looks different or lies far, and background clicks add
    nothing (a leak often looks like the lesion it touches)."""
    from lib.model.refiner import click_values, likeness_map

    image = torch.zeros(1, 1, 24, 24, 24)
    image[..., 8:16, 8:16, 8:16] = 2.0  # a lesion of its own intensity in a host of 0
    foreground = torch.tensor([[[10, 10, 10]]])
    values = click_values(image, foreground)
    assert torch.allclose(values, torch.tensor([[2.0]]))
    near = likeness_map(image, values, foreground, torch.tensor([[1]]), sigma=12.0)[0, 0]
    assert near[14, 14, 14] > 0.8 and near[10, 10, 10] > 0.99  # alike, inside the lesion (0.85: 7 voxels away)
    assert near[10, 10, 4] < 1e-3 and near[20, 20, 20] < 1e-3  # the host: not alike
    far = likeness_map(image, values, torch.tensor([[[0, 0, 0]]]), torch.tensor([[1]]), sigma=2.0)[0, 0]
    assert far[12, 12, 12] < 1e-3  # alike, but out of the click's reach
    assert likeness_map(image, values, foreground, torch.tensor([[0]]), sigma=12.0).abs().max() == 0


def test_only_correction_clicks_bring_their_likeness_to_the_refiner(tiny):
    """The first click, at a lesion's centre, may show a ring's necrotic core rather than what the rest of it looks
    like: a first round gives the same answer whatever the likeness input's weight; a foreground click after it
    changes the answer through that weight."""
    refiner = tiny.refiner
    with torch.no_grad():
        for p in refiner.parameters():
            p.normal_(0, 0.3)
    image = torch.randn(1, 1, 32, 32, 32)
    logits = torch.randn(1, 2, 32, 32, 32)
    one = (torch.tensor([[[16, 16, 16]]]), torch.tensor([[1]]))
    two = (torch.tensor([[[16, 16, 16], [16, 16, 22]]]), torch.tensor([[1, 1]]))

    def answers():
        with torch.no_grad():
            return refiner(image, logits, *one), refiner(image, logits, *two, previous=logits[:, 1:])

    first, correction = answers()
    with torch.no_grad():
        refiner.net[0].weight[:, -1] = 0
    first_without, correction_without = answers()
    assert torch.equal(first, first_without)
    assert not torch.allclose(correction, correction_without)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        build_sam3d(checkpoint=str(path), backbone="tiny")


def test_a_checkpoint_of_something_else_is_refused(tmp_path):
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint"):
        build_sam3d(checkpoint=str(tmp_path / "other.pt"))


def test_bfloat16_autocast_stays_close_to_float32(tiny):
    perturb(tiny)
    crop = torch.randn(TINY.crop_size, TINY.crop_size, TINY.crop_size)
    points = torch.tensor([[4, 20, 9]])
    full = Sam3DPredictor(tiny).predict_crop(crop, points)
    half_model = tiny.sharing_weights(bfloat16=True)
    half = Sam3DPredictor(half_model).predict_crop(crop, points)
    assert half.dtype == torch.float32 and not tiny.bfloat16
    assert half_model.encode(crop[None, None]).deep.dtype == torch.bfloat16  # the cache holds half the bytes
    assert 0 < (half - full).abs().max() < 0.1


def test_our_checkpoint_over_another_backbone_is_reported(tmp_path):
    """Adapters saved over one frozen backbone, loaded over another: the load says so in /info/'s weights. With no
    SAM checkpoint the backbone is build_sam3d's initialisation, the same at every build."""
    paths = {}
    for seed in (INITIALISATION_SEED, INITIALISATION_SEED + 1):  # the backbone build_sam3d makes, and another
        torch.manual_seed(seed)
        model = create_model(CONFIGS["tiny"])
        freeze_backbone(model)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        paths[seed] = str(tmp_path / f"sam3d_{seed}.pt")
        save_sam3d(model, paths[seed], "tiny", trained)
    meta = torch.load(paths[INITIALISATION_SEED], weights_only=True)["meta"]
    assert meta["crop_size"] == TINY.crop_size and meta["click_types"] == ["foreground", "background"]

    torch.manual_seed(5)  # the caller's random state does not decide the initialisation
    assert not any("WARNING" in s for s in build_sam3d(checkpoint=paths[INITIALISATION_SEED]).weights_info["loads"])
    assert "backbone differs" in " ".join(build_sam3d(checkpoint=paths[INITIALISATION_SEED + 1]).weights_info["loads"])


def optimiser_state_after_a_step(parameters) -> dict:
    """A real AdamW state, as the authors' train.py saves one per part (their optimiser and settings)."""
    parameters = [p.detach().clone().requires_grad_(True) for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0)
    sum((p**2).sum() for p in parameters).backward()
    optimizer.step()
    return optimizer.state_dict()


def saved_like_the_authors_train_py(model) -> dict:
    """What their train.py passes to torch.save: the epoch, the best validation loss (``np.mean`` of the losses:
    a numpy float64), the three parts' state dicts, the four prompt encoders and the three optimisers' states."""
    import numpy as np

    checkpoint = to_authors_format(model)
    checkpoint.update(
        epoch=12,
        best_val_loss=np.mean([0.41, 0.37, 0.39]),
        encoder_opt=optimiser_state_after_a_step(model.image_encoder.parameters()),
        feature_opt=optimiser_state_after_a_step(model.prompt_encoder.parameters()),
        decoder_opt=optimiser_state_after_a_step(model.mask_decoder.parameters()),
    )
    assert type(checkpoint["best_val_loss"]).__module__ == "numpy"
    return checkpoint


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-serialisation"])
def test_a_checkpoint_written_as_the_authors_train_py_writes_it_loads(tiny, tmp_path, zip_format):
    perturb(tiny)
    path = tmp_path / "best.pth.tar"
    torch.save(saved_like_the_authors_train_py(tiny), path, _use_new_zipfile_serialization=zip_format)
    loaded = build_sam3d(checkpoint=str(path))  # the backbone comes from the checkpoint
    for key, tensor in tiny.state_dict().items():
        if not key.startswith(SAM3D_ONLY):  # theirs has none: left at initialisation (their output is unchanged)
            assert torch.equal(loaded.state_dict()[key], tensor), key
    info = loaded.weights_info
    assert info["state"] == "authors" and info["warning"] is None and info["backbone"] == "tiny"
    assert "training state (optimisers, epoch)" in " ".join(info["loads"])


def test_a_checkpoint_that_still_cannot_load_names_the_file_the_reason_and_what_to_do(tiny, tmp_path):
    import argparse

    checkpoint = saved_like_the_authors_train_py(tiny)
    checkpoint["args"] = argparse.Namespace(lr=1e-4)  # an object a weights-only load must not build
    path = tmp_path / "with_args.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError) as error:
        build_sam3d(checkpoint=str(path))
    message = str(error.value)
    assert str(path) in message and "argparse" in message and "--conf checkpoint" in message


def test_each_weight_state_says_what_it_is(tiny, tmp_path):
    perturb(tiny)
    torch.save(to_authors_format(tiny), tmp_path / "authors.pth.tar")
    everything = list(tiny.state_dict())  # a random backbone is not rebuilt identically: keep all of it
    save_sam3d(tiny, str(tmp_path / "ours.pt"), "tiny", everything)
    save_sam3d(tiny, str(tmp_path / "demo.pt"), "tiny", everything, meta={"demo": True})
    states = {
        "authors": build_sam3d(checkpoint=str(tmp_path / "authors.pth.tar")).weights_info,
        "trained": build_sam3d(checkpoint=str(tmp_path / "ours.pt")).weights_info,
        "demo": build_sam3d(checkpoint=str(tmp_path / "demo.pt")).weights_info,
        "untrained": build_sam3d(backbone="tiny").weights_info,
    }
    for state, info in states.items():
        assert info["state"] == state
    assert states["authors"]["warning"] is None and states["trained"]["warning"] is None
    assert "DEMO WEIGHTS" in states["demo"]["warning"] and "--conf checkpoint" in states["demo"]["warning"]
    untrained = states["untrained"]["warning"]
    assert "UNTRAINED" in untrained and "backbone is random" in untrained and "POST /train/sam3d" in untrained
