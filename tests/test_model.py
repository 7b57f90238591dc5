"The CAV-MAE Sync model and losses: shapes, masking, loss composition, ablation switches, classifier, speed paths."

import math

import pytest
import torch

from cavmae_sync.losses import info_nce, masked_mse
from cavmae_sync.model import (
    CAVMAESync,
    ModelConfig,
    cavmae,
    cavmae_sync,
    random_masking,
    restore_order,
    sincos_pos_embed_2d,
    tiny,
)
from cavmae_sync.classifier import CAVMAESyncClassifier


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def small(**overrides):
    return tiny(modality_depth=1, decoder_depth=1, **overrides)


def inputs(cfg: ModelConfig, batch: int = 2):
    return torch.randn(batch, cfg.audio_length, cfg.num_mel_bins), torch.randn(
        batch, 3, cfg.image_size, cfg.image_size
    )


def test_presets_match_the_paper():
    sync, base, t = cavmae_sync(), cavmae(), tiny()
    assert (sync.embed_dim, sync.num_heads, sync.modality_depth, sync.joint_depth) == (
        768,
        12,
        11,
        1,
    )
    assert (sync.audio_length, sync.num_frames, sync.num_registers, sync.global_tokens) == (
        416,
        16,
        8,
        True,
    )
    assert (sync.num_audio_patches, sync.num_video_patches, sync.audio_grid) == (208, 196, (8, 26))
    assert (sync.decoder_embed_dim, sync.decoder_depth, sync.decoder_num_heads) == (512, 8, 16)
    assert (
        sync.contrastive_weight,
        sync.temperature,
        sync.mask_ratio_audio,
        sync.mask_ratio_video,
    ) == (0.01, 0.05, 0.75, 0.75)
    assert (
        base.audio_length,
        base.num_frames,
        base.num_registers,
        base.global_tokens,
        base.num_audio_patches,
    ) == (1024, 1, 0, False, 512)
    assert (
        t.num_registers == 4
        and t.num_video_patches == 36
        and tiny(num_registers=2).num_registers == 2
    )
    n = sum(p.numel() for p in CAVMAESync(t).parameters())
    assert 2e6 < n < 8e6


def test_config_validation_and_roundtrip():
    cfg = tiny(audio_mask_mode='time')
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (
        dict(audio_length=250),
        dict(embed_dim=190),
        dict(mask_ratio_video=-0.1),
        dict(temperature=0.0),
        dict(num_registers=-1),
        dict(global_tokens=False, global_local_contrast=True),
    ):
        with pytest.raises(ValueError):
            tiny(**bad)
    with pytest.raises(ValueError, match='unknown'):
        ModelConfig.from_dict({**cfg.to_dict(), 'registers': 3})


def test_sincos_positions_follow_the_frequency_by_time_grid():
    pe = sincos_pos_embed_2d(64, 8, 6)  # audio: 8 frequency rows x 6 time columns
    rows = pe.reshape(8, 6, 64)
    assert torch.allclose(rows[:, 0, :32], rows[0, 0, :32])  # column half is constant down a column
    assert torch.allclose(
        rows[0, :, 32:], rows[0, 0, 32:].expand(6, 32)
    )  # row half is constant along a row
    assert math.isclose(pe[7, 0].item(), math.sin(1.0), abs_tol=1e-6) and math.isclose(
        pe[7, 32].item(), math.sin(1.0), abs_tol=1e-6
    )


def test_audio_patch_order_is_frequency_rows_then_time():
    model = CAVMAESync(small())
    audio = torch.zeros(1, 256, 128)
    audio[0, 16:32, 0:16] = 1.0  # time frames 16..31, mel bins 0..15 -> row 0, column 1
    patches = model.patchify_audio(audio)
    assert patches.shape == (1, 128, 256)
    assert patches[0, 1].sum() == 256 and patches.sum() == 256
    audio[0, 0:16, 16:32] = 2.0  # mel bins 16..31, frames 0..15 -> row 1, column 0 = patch 16
    assert model.patchify_audio(audio)[0, 16].sum() == 512
    assert torch.equal(model.unpatchify_audio(model.patchify_audio(audio)), audio)


@pytest.mark.parametrize(
    'mode,lines', [('unstructured', None), ('time', 12), ('frequency', 6), ('time_frequency', None)]
)
def test_masking_modes_keep_the_same_count(mode, lines):
    x = torch.randn(3, 128, 4)
    m = random_masking(x, 0.75, mode, grid=(8, 16))
    assert m.kept.shape == (3, 32, 4) and (m.mask.sum(1) == 96).all()
    restored = restore_order(m.kept, torch.full((1, 1, 4), float('nan')), m.ids_restore)
    assert (
        torch.equal(restored[m.mask == 0], x[m.mask == 0]) and restored[m.mask == 1].isnan().all()
    )
    grid = m.mask.reshape(3, 8, 16).bool()
    if mode == 'time':
        assert (grid.all(dim=1).sum(1) == lines).all()
    if mode == 'frequency':
        assert (grid.all(dim=2).sum(1) == lines).all()
    if mode == 'time_frequency':
        assert (grid.all(dim=1).sum(1) >= int(16 * 0.75 * 0.7)).all() and (
            grid.all(dim=2).sum(1) >= int(8 * 0.75 * 0.7)
        ).all()


def test_pretraining_forward_shapes_and_loss_composition():
    cfg = small(contrastive_weight=0.3, mae_weight=2.0)
    model = CAVMAESync(cfg)
    audio, frames = inputs(cfg, 4)
    out = model(audio, frames)
    assert out.pred_audio.shape == (4, 128, 256) and out.pred_video.shape == (4, 36, 768)
    assert (out.mask_audio.sum(1) == 96).all() and (out.mask_video.sum(1) == 27).all()
    assert torch.isclose(
        out.loss, 2.0 * (out.mae_loss_audio + out.mae_loss_video) + 0.3 * out.contrastive_loss
    )
    # the losses are the documented functions of the returned predictions and masks
    assert torch.isclose(
        out.mae_loss_audio,
        masked_mse(out.pred_audio, model.patchify_audio(audio), out.mask_audio, norm_pix=True),
    )
    assert torch.isclose(
        out.contrastive_loss, info_nce(out.audio_embedding, out.video_embedding, 0.05).loss
    )
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f'trainable parameters without gradient (DDP would fail): {no_grad}'
    out2 = model(audio, frames, mask_ratio_a=0.5, mask_ratio_v=0.0)
    assert (
        (out2.mask_audio.sum(1) == 64).all()
        and out2.mask_video.sum() == 0
        and out2.mae_loss_video == 0
    )


def test_mask_ratio_zero_is_deterministic_despite_shuffling():
    model = CAVMAESync(small()).eval()
    audio, frames = inputs(model.config)
    with torch.no_grad():
        a, b = model(audio, frames, 0.0, 0.0), model(audio, frames, 0.0, 0.0)
    assert torch.allclose(a.pred_audio, b.pred_audio, atol=1e-5) and torch.allclose(
        a.contrastive_loss, b.contrastive_loss, atol=1e-6
    )


def test_encode_streams_are_independent_and_use_global_tokens():
    model = CAVMAESync(small()).eval()
    audio, frames = inputs(model.config, 3)
    with torch.no_grad():
        e1 = model.encode(audio, frames)
        e2 = model.encode(audio, torch.randn_like(frames))
    assert torch.equal(e1.audio_tokens, e2.audio_tokens) and not torch.allclose(
        e1.video_tokens, e2.video_tokens
    )
    assert e1.audio_tokens.shape == (3, 128, 192) and e1.video_global.shape == (3, 192)
    assert torch.equal(e1.audio_embedding, e1.audio_global)
    # each output is layer-normalized by norm_a / norm_v (unit variance before the affine, which starts at identity)
    assert torch.allclose(e1.audio_global.std(-1, unbiased=False), torch.ones(3), atol=1e-3)


def test_registers_change_the_output_but_not_the_shape():
    cfg = small()
    model = CAVMAESync(cfg).eval()
    audio, frames = inputs(cfg)
    with torch.no_grad():
        before = model.encode(audio, frames)
        model.register_tokens[: cfg.num_registers].add_(1.0)  # audio registers only
        after = model.encode(audio, frames)
    assert not torch.allclose(before.audio_global, after.audio_global) and torch.equal(
        before.video_global, after.video_global
    )
    assert after.audio_tokens.shape == before.audio_tokens.shape


def test_baseline_preset_uses_mean_patch_embeddings():
    cfg = tiny(
        modality_depth=1,
        decoder_depth=1,
        global_tokens=False,
        num_registers=0,
        audio_length=1024,
        num_frames=1,
    )
    model = CAVMAESync(cfg)
    assert not any(
        n.startswith(('cls_token', 'register_tokens')) for n, _ in model.named_parameters()
    )
    audio, frames = inputs(cfg)
    out = model(audio, frames)
    assert out.pred_audio.shape == (2, 512, 256)
    enc = model.eval().encode(audio, frames)
    assert enc.audio_global is None and torch.allclose(
        enc.audio_embedding, enc.audio_tokens.mean(1)
    )


@pytest.mark.parametrize(
    'overrides',
    [
        dict(contrastive_heads=True),
        dict(bidirectional_contrast=True),
        dict(global_local_contrast=True),
        dict(joint_depth=2),
        dict(audio_mask_mode='frequency'),
        dict(num_registers=0),
        dict(global_tokens=False),
        dict(norm_pix_loss=False),
    ],
)
def test_ablation_switches_train(overrides):
    model = CAVMAESync(small(**overrides))
    out = model(*inputs(model.config, 3))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if overrides.get('global_local_contrast'):
        assert out.contrastive_loss_local is not None


def test_bidirectional_contrast_is_the_mean_of_both_directions():
    audio_emb, video_emb = torch.randn(6, 192), torch.randn(6, 192)
    forward, backward = (
        info_nce(audio_emb, video_emb, 0.05).loss,
        info_nce(video_emb, audio_emb, 0.05).loss,
    )  # a->v columns, v->a
    assert not torch.isclose(forward, backward, rtol=1e-3)
    single, both = CAVMAESync(small()), CAVMAESync(small(bidirectional_contrast=True))
    assert torch.isclose(single.contrastive(audio_emb, video_emb).loss, forward)
    assert torch.isclose(both.contrastive(audio_emb, video_emb).loss, (forward + backward) / 2)
    out = both(*inputs(both.config, 6))  # the training loss uses it
    a, v = out.audio_embedding, out.video_embedding
    one_way, other_way = info_nce(a, v, 0.05).loss, info_nce(v, a, 0.05).loss
    assert not torch.isclose(one_way, other_way, rtol=1e-4)
    assert torch.isclose(out.contrastive_loss, (one_way + other_way) / 2, rtol=1e-5)


def test_global_local_contrast_averages_the_global_and_the_patch_mean_losses():
    model = CAVMAESync(small(global_local_contrast=True))
    out = model(*inputs(model.config, 4))
    global_loss = info_nce(out.audio_embedding, out.video_embedding, 0.05).loss
    assert not torch.isclose(global_loss, out.contrastive_loss_local, rtol=1e-4)
    assert torch.isclose(
        out.contrastive_loss, (global_loss + out.contrastive_loss_local) / 2, rtol=1e-5
    )


@pytest.mark.parametrize('mode', ['unstructured', 'time', 'frequency', 'time_frequency'])
def test_audio_mask_mode_shapes_the_models_mask(mode):
    "The pretraining forward masks whole frequency rows ('frequency'), whole time columns ('time'), both, or patches."
    cfg = small(audio_mask_mode=mode)
    model = CAVMAESync(cfg)
    audio, frames = inputs(cfg, 4)
    out = model(audio, frames)
    rows, cols = cfg.audio_grid  # (8 frequency rows, 16 time columns)
    grid = out.mask_audio.reshape(4, rows, cols).bool()  # (B, F, T)
    whole_rows, whole_cols = (
        grid.all(2, keepdim=True),
        grid.all(1, keepdim=True),
    )  # (B, F, 1), (B, 1, T)
    by_rows, by_cols = (
        torch.equal(grid, whole_rows.expand_as(grid)),
        torch.equal(grid, whole_cols.expand_as(grid)),
    )
    assert (out.mask_audio.sum(1) == 96).all()  # 75% of 128 patches in every mode
    if mode == 'frequency':
        assert by_rows and (whole_rows.sum((1, 2)) == 6).all()
    if mode == 'time':
        assert by_cols and (whole_cols.sum((1, 2)) == 12).all()
    if mode == 'time_frequency':
        assert (whole_rows.sum((1, 2)) >= int(rows * 0.75 * 0.7)).all() and (
            whole_cols.sum((1, 2)) >= int(cols * 0.75 * 0.7)
        ).all()
    if mode == 'unstructured':
        assert not by_rows and not by_cols and (whole_rows.sum((1, 2)) < 3).all()
    assert (out.mask_video.sum(1) == 27).all()  # the visual mask is unstructured whatever the mode
    assert torch.isclose(
        out.mae_loss_audio,
        masked_mse(out.pred_audio, model.patchify_audio(audio), out.mask_audio, norm_pix=True),
    )


def test_norm_pix_loss_switch_changes_the_target():
    torch.manual_seed(1)
    cfg = small()
    audio, frames = inputs(cfg)
    audio, frames = 3 * audio + 2, 3 * frames - 1  # patches far from zero mean / unit variance
    for norm_pix in (True, False):
        model = CAVMAESync(small(norm_pix_loss=norm_pix))
        out = model(audio, frames)
        for loss, pred, target, mask in (
            (out.mae_loss_audio, out.pred_audio, model.patchify_audio(audio), out.mask_audio),
            (out.mae_loss_video, out.pred_video, model.patchify_video(frames), out.mask_video),
        ):
            assert torch.isclose(loss, masked_mse(pred, target, mask, norm_pix=norm_pix))
            assert not torch.isclose(
                loss, masked_mse(pred, target, mask, norm_pix=not norm_pix), rtol=0.1
            )


def test_joint_depth_two_runs_both_joint_blocks():
    one, two = CAVMAESync(small()), CAVMAESync(small(joint_depth=2))
    assert len(one.blocks_u) == 1 and len(two.blocks_u) == 2
    assert {k for k in two.state_dict() if k.startswith('blocks_u.1.')} and not {
        k for k in one.state_dict() if k.startswith('blocks_u.1.')
    }
    two.load_state_dict(
        {**two.state_dict(), **one.state_dict()}
    )  # every weight of `one`; block 1 stays its own
    one.eval(), two.eval()
    audio, frames = inputs(one.config)

    def outputs(model):
        with torch.no_grad():
            torch.manual_seed(7)
            out = model(audio, frames)
            return [
                model.encode(audio, frames).audio_tokens,
                model.encode(audio, frames).video_global,
                out.pred_audio,
                out.loss[None],
            ]

    reference, second = outputs(one), outputs(two)
    assert all(
        not torch.allclose(a, b, atol=1e-4) for a, b in zip(reference, second)
    )  # block 1 changes every output
    with torch.no_grad():  # block 1 as the identity (zero residual branches)
        for layer in (two.blocks_u[1].attn.proj, two.blocks_u[1].mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    assert all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip(reference, outputs(two))
    )  # ... then they are the same model


@pytest.mark.parametrize(
    'fields',
    [
        dict(),
        dict(num_registers=0),
        dict(global_tokens=False),
        dict(audio_length=128),
        dict(audio_length=512),
    ],
)
def test_ablation_variants_change_the_token_sequence(fields):
    """The trained variants of ablations.ipynb: registers appended and dropped, a global token
    prepended, L/16 time columns of audio."""
    from cavmae_sync.train_config import TrainConfig

    cfg = small(**fields)
    model = CAVMAESync(cfg).eval()
    lengths = []
    model.blocks_a[0].register_forward_hook(
        lambda module, args, out: lengths.append((args[0].shape[1], out.shape[1]))
    )
    audio, frames = inputs(cfg)
    with torch.no_grad():
        enc = model.encode(audio, frames)
    G, R, N = int(cfg.global_tokens), cfg.num_registers, 8 * cfg.audio_length // 16
    assert lengths == [(G + N + R, G + N + R)] and enc.audio_tokens.shape == (
        2,
        N,
        192,
    )  # registers dropped after the blocks
    params = dict(model.named_parameters())
    assert ('register_tokens' in params) == (R > 0) and ('cls_token_a' in params) == bool(G)
    assert params['pos_embed_a'].shape == (1, N, 192)
    if G:
        assert torch.equal(enc.audio_embedding, enc.audio_global)
    else:
        assert enc.audio_global is None and torch.allclose(
            enc.audio_embedding, enc.audio_tokens.mean(1), atol=1e-6
        )
    assert (
        TrainConfig(model=cfg).preprocess().window == cfg.audio_length
    )  # training windows follow the model's length
    with pytest.raises(ValueError, match='audio must be'):
        model.encode(torch.randn(2, cfg.audio_length + 16, 128), frames)


def test_learnable_positions_switch():
    fixed, learned = CAVMAESync(small()), CAVMAESync(small(learnable_pos_embed=True))
    assert (
        not fixed.pos_embed_a.requires_grad
        and learned.pos_embed_a.requires_grad
        and learned.decoder_pos_embed_v.requires_grad
    )
    assert torch.equal(
        fixed.pos_embed_a, learned.pos_embed_a
    )  # both start from the sin-cos positions
    learned(*inputs(learned.config)).loss.backward()
    assert learned.pos_embed_a.grad is not None and learned.pos_embed_a.grad.abs().sum() > 0


def test_contrastive_heads_apply_to_the_contrastive_features():
    model = CAVMAESync(small(contrastive_heads=True)).eval()
    assert len(model.constrative_head_audio) == 2 and len(model.constrative_head_visual) == 2
    audio, frames = inputs(model.config)
    with torch.no_grad():
        before = model.encode(audio, frames)
        model.constrative_head_audio[1].mlp.fc2.bias.add_(1.0)
        after = model.encode(audio, frames)
    assert not torch.allclose(before.audio_embedding, after.audio_embedding)


def test_mae_weight_zero_skips_the_decoder():
    model = CAVMAESync(small(mae_weight=0.0))
    out = model(*inputs(model.config))
    assert (
        out.pred_audio is None
        and out.mae_loss_audio == 0
        and torch.isclose(out.loss, 0.01 * out.contrastive_loss)
    )
    out.loss.backward()
    unused = {
        n.split('.')[0] for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    }
    assert unused <= {
        'decoder_embed',
        'mask_token',
        'decoder_modality_a',
        'decoder_modality_v',
        'decoder_blocks',
        'decoder_norm',
        'decoder_pred_a',
        'decoder_pred_v',
        'blocks_u',
        'norm',
    }, unused


def test_gradient_checkpointing_gives_the_same_gradients():
    model = CAVMAESync(tiny(modality_depth=2, decoder_depth=2))
    audio, frames = inputs(model.config)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(flag)
        torch.manual_seed(5)
        model(audio, frames).loss.backward()
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_bf16_autocast_on_cpu():
    model = CAVMAESync(small())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(*inputs(model.config))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_torch_compile_full_graph_matches_eager():
    "Dynamo + AOT autograd capture the whole training step in one graph (no graph breaks) with eager numerics."
    model = CAVMAESync(small())
    audio, frames = inputs(model.config)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    torch.manual_seed(3)
    out_c = compiled(audio, frames)
    out_c.loss.backward()
    grad_c = model.blocks_a[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(3)
    out_e = model(audio, frames)
    out_e.loss.backward()
    assert torch.allclose(out_c.loss, out_e.loss, atol=1e-6)
    assert torch.allclose(grad_c, model.blocks_a[0].attn.qkv.weight.grad, atol=1e-6)
    clf = CAVMAESyncClassifier(small(), 3, aggregation='attention')
    logits = torch.compile(clf, backend='aot_eager', fullgraph=True)(
        audio[:, None], frames[:, None]
    )
    assert logits.shape == (2, 3)


def test_torch_compile_inductor_encode():
    "The real inductor backend on the retrieval path (forward only; the training step is compiled in bench/)."
    model = CAVMAESync(small()).eval()
    audio, frames = inputs(model.config)
    with torch.no_grad():
        eager = model.encode(audio, frames)
        compiled = torch.compile(model.encode)(audio, frames)
    assert torch.allclose(eager.audio_tokens, compiled.audio_tokens, atol=1e-4)
    assert torch.allclose(eager.video_embedding, compiled.video_embedding, atol=1e-4)


def test_classifier_modes_and_frame_aggregation():
    cfg = small()
    pretrained = CAVMAESync(cfg)
    clf = CAVMAESyncClassifier(cfg, 7)
    clf.load_encoder_state_dict(pretrained.state_dict())
    audio, frames = torch.randn(2, 4, 256, 128), torch.randn(2, 4, 3, 96, 96)
    logits = clf(audio, frames)
    assert logits.shape == (2, 7)
    feats = clf.frame_features(audio.flatten(0, 1), frames.flatten(0, 1)).reshape(2, 4, -1)
    assert torch.allclose(logits, clf.mlp_head(feats.mean(1)), atol=1e-5)
    # frame order does not matter for the mean, and one frame equals T=1
    assert torch.allclose(clf(audio.flip(1), frames.flip(1)), logits, atol=1e-5)
    assert torch.allclose(
        clf(audio[:, 0], frames[:, 0]), clf(audio[:, :1], frames[:, :1]), atol=1e-6
    )
    for modality, kwargs in (('audio', dict(audio=audio)), ('video', dict(frames=frames))):
        one = CAVMAESyncClassifier(cfg, 7, modality=modality, aggregation='attention')
        out = one(**kwargs)
        out.sum().backward()
        assert out.shape == (2, 7)
        assert not [n for n, p in one.named_parameters() if p.requires_grad and p.grad is None]
    audio_only = CAVMAESyncClassifier(small(learnable_pos_embed=True), 7, modality='audio')
    audio_only(audio=audio).sum().backward()
    assert not [n for n, p in audio_only.named_parameters() if p.requires_grad and p.grad is None]
    with pytest.raises(ValueError, match='frames'):
        clf(audio)
    with pytest.raises(ValueError, match='differ'):
        clf(audio, frames[:, :3])
    with pytest.raises(ValueError, match='modality'):
        CAVMAESyncClassifier(cfg, 7, modality='both')


def test_classifier_rejects_foreign_encoder_weights():
    clf = CAVMAESyncClassifier(small(), 3)
    sd = CAVMAESync(small()).state_dict()
    with pytest.raises(ValueError, match='blocks_a.0.attn.qkv.weight'):
        clf.load_encoder_state_dict({**sd, 'blocks_a.0.attn.qkv.weight': torch.zeros(3, 3)})
    with pytest.raises(ValueError, match='norm_a.bias'):
        clf.load_encoder_state_dict({k: v for k, v in sd.items() if k != 'norm_a.bias'})


def test_wrong_inputs_name_the_problem():
    model = CAVMAESync(small())
    audio, frames = inputs(model.config)
    with pytest.raises(ValueError, match='audio must be'):
        model(audio[:, :100], frames)
    with pytest.raises(ValueError, match='frames must be'):
        model.encode(audio, frames[..., :64, :64])
    with pytest.raises(ValueError, match='batch size'):
        model(audio, frames[:1])
