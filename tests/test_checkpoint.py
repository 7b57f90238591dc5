"Official checkpoints load strictly and reproduce the official outputs; our checkpoints save atomically and resume."

import gc
import json

import pytest
import torch

from cavmae_sync.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    infer_official_config,
    init_from_imagenet_mae,
    load_checkpoint,
    load_official,
    restore_rng_state,
    save_checkpoint,
    strip_prefix,
)
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.classifier import CAVMAESyncClassifier


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def reference(reference_dir):
    return torch.load(reference_dir / 'official_features_tiny.pt', weights_only=False)


@pytest.fixture(scope='module')
def manifest(reference_dir):
    return json.loads((reference_dir / 'official_state_dict_manifest.json').read_text())


def meta_state_dict(shapes: dict) -> dict:
    return {'module.' + k: torch.empty(s, device='meta') for k, s in shapes.items()}


def load_reference(reference):
    ctor = reference['constructor']
    return load_official(
        reference['state_dict'],
        num_heads=ctor['num_heads'],
        decoder_num_heads=ctor['decoder_num_heads'],
    )


def test_official_tiny_encode_reproduces_forward_feat(reference):
    model = load_reference(reference)
    assert not model.training
    c = model.config
    assert (
        c.embed_dim,
        c.num_registers,
        c.global_tokens,
        c.audio_length,
        c.image_size,
        c.modality_depth,
    ) == (64, 4, True, 96, 64, 11)
    assert (c.decoder_embed_dim, c.decoder_depth) == (32, 2)
    with torch.no_grad():
        enc = model.encode(reference['audio'], reference['video'])
    for ours, key in (
        (enc.audio_tokens, 'patch_a'),
        (enc.video_tokens, 'patch_v'),
        (enc.audio_global, 'global_a'),
        (enc.video_global, 'global_v'),
    ):
        assert ours.shape == reference[key].shape
        assert (ours - reference[key]).abs().max() < 1e-5, key


def test_official_tiny_pretraining_forward_reproduces_decoder_and_contrast(reference):
    model = load_reference(reference)
    with torch.no_grad():
        out = model(reference['audio'], reference['video'], mask_ratio_a=0.0, mask_ratio_v=0.0)
    assert (out.pred_audio - reference['pred_a']).abs().max() < 1e-4
    assert (out.pred_video - reference['pred_v']).abs().max() < 1e-4
    assert (out.contrastive_loss - reference['contrastive_loss']).abs() < 1e-5
    assert torch.isclose(out.contrastive_accuracy, reference['contrastive_accuracy'])


def test_official_tiny_does_not_alias_the_callers_tensors(reference):
    model = load_reference(reference)
    assert (
        model.norm_a.weight.data_ptr() != reference['state_dict']['module.norm_a.weight'].data_ptr()
    )


def test_official_tiny_from_a_file(reference, tmp_path):
    path = tmp_path / 'official.pth'
    torch.save(reference['state_dict'], path)
    model = load_official(path, num_heads=4, decoder_num_heads=4)
    with torch.no_grad():
        enc = model.encode(reference['audio'], reference['video'])
    assert (enc.video_global - reference['global_v']).abs().max() < 1e-5


@pytest.mark.parametrize(
    'variant',
    [
        'cavmae_sync_pretrain_released',
        'cavmae_sync_pretrain_ch',
        'cavmae_sync_finetune',
        'cavmae_pretrain',
        'cavmae_finetune',
    ],
)
def test_every_official_variant_loads(manifest, variant):
    entry = manifest[variant]
    ctor = entry['constructor']
    model = load_official(meta_state_dict(entry['state_dict']))
    c = model.config
    assert set(model.state_dict()) == set(entry['state_dict'])
    assert all(
        tuple(v.shape) == tuple(entry['state_dict'][k]) for k, v in model.state_dict().items()
    )
    assert (c.embed_dim, c.modality_depth, c.joint_depth) == (
        768,
        ctor['modality_specific_depth'],
        1,
    )
    assert c.audio_length == ctor.get('audio_length', 1024)
    assert c.num_registers == ctor.get('num_register_tokens', 0) and c.global_tokens == ctor.get(
        'cls_token', False
    )
    assert c.contrastive_heads == ctor.get('contrastive_heads', False)
    if 'label_dim' in ctor:
        assert isinstance(model, CAVMAESyncClassifier) and model.num_classes == ctor['label_dim']
    else:
        assert type(model) is CAVMAESync and (c.decoder_embed_dim, c.decoder_depth) == (512, 8)
    assert c.num_frames == (1 if variant.startswith('cavmae_') and 'sync' not in variant else 16)


def test_released_sync_model_runs_with_real_memory(manifest):
    "One ViT-B variant with real (zero) tensors, freed afterwards: the inferred model runs on the paper's inputs."
    shapes = manifest['cavmae_sync_finetune']['state_dict']
    sd = {'module.' + k: torch.zeros(s) for k, s in shapes.items()}
    model = load_official(sd)
    del sd
    with torch.no_grad():
        logits = model(torch.randn(1, 2, 416, 128), torch.randn(1, 2, 3, 224, 224))
        enc = model.encode(torch.randn(1, 416, 128), torch.randn(1, 3, 224, 224))
    assert (
        logits.shape == (1, 309)
        and enc.audio_tokens.shape == (1, 208, 768)
        and enc.video_tokens.shape == (1, 196, 768)
    )
    del model
    gc.collect()


def test_strict_errors_name_the_tensor(manifest):
    shapes = dict(manifest['cavmae_sync_pretrain_released']['state_dict'])
    with pytest.raises(CheckpointError, match=r"missing tensors \['blocks_v.10.mlp.fc2.bias'\]"):
        load_official(
            meta_state_dict({k: v for k, v in shapes.items() if k != 'blocks_v.10.mlp.fc2.bias'})
        )
    with pytest.raises(CheckpointError, match='unexpected tensors.*head.weight'):
        load_official(meta_state_dict({**shapes, 'head.weight': [10, 768]}))
    with pytest.raises(CheckpointError, match=r'decoder_pos_embed_v: checkpoint \(1, 197, 512\)'):
        load_official(meta_state_dict({**shapes, 'decoder_pos_embed_v': [1, 197, 512]}))
    with pytest.raises(CheckpointError, match='register_tokens: 15 rows'):
        load_official(meta_state_dict({**shapes, 'register_tokens': [15, 768]}))
    no_head = {k: v for k, v in shapes.items() if not k.startswith(('decoder', 'mask_token'))}
    with pytest.raises(CheckpointError, match='neither an MAE decoder'):
        load_official(meta_state_dict(no_head))
    with pytest.raises(ValueError, match='not divisible'):
        load_official(meta_state_dict(shapes), num_heads=7)


def test_unreadable_official_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_official(tmp_path / 'missing.pth')
    (tmp_path / 'junk.pth').write_text('junk')
    with pytest.raises(CheckpointError, match='junk.pth'):
        load_official(tmp_path / 'junk.pth')
    torch.save({'epoch': 3}, tmp_path / 'meta.pth')
    with pytest.raises(CheckpointError, match='meta.pth: not a state dict'):
        load_official(tmp_path / 'meta.pth')


def test_infer_config_from_our_own_model():
    model = CAVMAESync(tiny(contrastive_heads=True))
    layout = infer_official_config(
        strip_prefix({'module.' + k: v for k, v in model.state_dict().items()}),
        num_heads=3,
        decoder_num_heads=4,
    )
    assert layout.kind == 'pretrain'
    assert layout.config == tiny(
        contrastive_heads=True, frame_preset='released'
    )  # read as released weights: fed the released frames


def test_save_and_resume_roundtrip(tmp_path):
    model = CAVMAESync(tiny(modality_depth=1, decoder_depth=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    model(torch.randn(2, 256, 128), torch.randn(2, 3, 96, 96)).loss.backward()
    opt.step()
    sched.step()
    rng = capture_rng_state()
    path = save_checkpoint(
        tmp_path / 'ckpt' / 'step7.pt',
        model,
        model.config,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        step=7,
        rng=rng,
    )
    draw = torch.rand(4)
    ckpt = load_checkpoint(path)
    assert (
        isinstance(ckpt, Checkpoint)
        and ckpt.config == model.config
        and ckpt.training_state['step'] == 7
    )
    restore_rng_state(ckpt.training_state['rng'])
    assert torch.equal(torch.rand(4), draw)
    restored = ckpt.build_model()
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    assert [n for n, p in restored.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    opt2 = torch.optim.AdamW([p for p in restored.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(ckpt.training_state['optimizer'])
    assert opt2.state_dict()['state'][0]['step'] == opt.state_dict()['state'][0]['step']


def test_save_unwraps_compiled_models_and_checks_config(tmp_path):
    model = CAVMAESync(tiny(modality_depth=1, decoder_depth=1))
    path = save_checkpoint(tmp_path / 'c.pt', torch.compile(model))
    assert not any(k.startswith('_orig_mod') for k in load_checkpoint(path).state_dict)
    with pytest.raises(ValueError, match='modality_depth'):
        save_checkpoint(tmp_path / 'd.pt', model, tiny())
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / 'e.pt', torch.nn.Linear(2, 2))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = CAVMAESync(tiny(modality_depth=1, decoder_depth=1))
    path = save_checkpoint(tmp_path / 'last.pt', model, step=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise RuntimeError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(RuntimeError, match='disk full'):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['last.pt']
    monkeypatch.undo()
    assert load_checkpoint(path).training_state['step'] == 1


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        load_checkpoint(tmp_path / 'nope.pt')
    torch.save(
        CAVMAESync(tiny(modality_depth=1, decoder_depth=1)).state_dict(), tmp_path / 'raw.pt'
    )
    with pytest.raises(CheckpointError, match='raw.pt: not a cavmae_sync checkpoint'):
        load_checkpoint(tmp_path / 'raw.pt')


def test_classifier_checkpoint_roundtrip(tmp_path):
    clf = CAVMAESyncClassifier(
        tiny(modality_depth=1), 5, modality='audio', aggregation='attention', attention_depth=1
    )
    back = load_checkpoint(save_checkpoint(tmp_path / 'clf.pt', clf)).build_model()
    assert (back.num_classes, back.modality, back.aggregation, len(back.aggregator.blocks)) == (
        5,
        'audio',
        'attention',
        1,
    )
    audio = torch.randn(2, 3, 256, 128)
    assert torch.allclose(back.eval()(audio), clf.eval()(audio))


def test_official_finetune_weights_load_into_the_classifier_from_pretraining(reference):
    "A classifier built from an official pretraining state dict gets exactly its encoder weights."
    pretrained = load_reference(reference)
    clf = CAVMAESyncClassifier(pretrained.config, 10)
    skipped = clf.load_encoder_state_dict(pretrained.state_dict())
    assert 'decoder_embed.weight' in skipped and 'mask_token' in skipped
    assert torch.equal(clf.register_tokens, pretrained.register_tokens)
    with torch.no_grad():
        enc_clf = clf.eval().encode(reference['audio'], reference['video'])
    assert (enc_clf.audio_global - reference['global_a']).abs().max() < 1e-5


def test_init_from_imagenet_timm_module_and_file(tmp_path):
    timm = pytest.importorskip('timm')
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0)
    src = vit.state_dict()
    model = CAVMAESync(tiny())
    report = init_from_imagenet_mae(model, vit)
    for i in range(4):
        for part in ('attn.qkv.weight', 'attn.proj.bias', 'mlp.fc1.weight', 'norm2.bias'):
            assert torch.equal(
                model.state_dict()[f'blocks_a.{i}.{part}'], src[f'blocks.{i}.{part}']
            )
            assert torch.equal(
                model.state_dict()[f'blocks_v.{i}.{part}'], src[f'blocks.{i}.{part}']
            )
    for norm in ('norm1', 'norm1_a', 'norm1_v'):
        assert torch.equal(
            model.state_dict()[f'blocks_u.0.{norm}.weight'], src['blocks.4.norm1.weight']
        )
    assert torch.equal(model.patch_embed_v.proj.weight, src['patch_embed.proj.weight'])
    assert torch.equal(
        model.patch_embed_a.proj.weight, src['patch_embed.proj.weight'].sum(1, keepdim=True)
    )
    assert torch.equal(model.cls_token_a, src['cls_token'] + src['pos_embed'][:, :1])
    assert (
        'blocks.11.mlp.fc2.weight' in report.unused and 'decoder_embed.weight' not in report.copied
    )
    # the same from an MAE-style file ({'model': state_dict} with a DataParallel prefix)
    torch.save(
        {'model': {'module.' + k: v for k, v in src.items()}, 'epoch': 799},
        tmp_path / 'mae_pretrain_vit_tiny.pth',
    )
    other = CAVMAESync(tiny())
    init_from_imagenet_mae(other, tmp_path / 'mae_pretrain_vit_tiny.pth')
    assert torch.equal(other.blocks_v[3].mlp.fc2.weight, src['blocks.3.mlp.fc2.weight'])


def test_init_from_imagenet_timm_name_without_download():
    pytest.importorskip('timm')
    model = CAVMAESync(tiny())
    before = model.blocks_a[0].attn.qkv.weight.clone()
    report = init_from_imagenet_mae(model, 'vit_tiny_patch16_224', pretrained=False)
    assert not torch.equal(before, model.blocks_a[0].attn.qkv.weight)
    assert torch.equal(
        model.blocks_a[0].attn.qkv.weight, model.blocks_v[0].attn.qkv.weight
    )  # both from ViT block 0
    assert len(report.copied) > 100


def test_init_from_imagenet_errors(tmp_path):
    timm = pytest.importorskip('timm')
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match='blocks_a.0.norm1.weight'):
        init_from_imagenet_mae(CAVMAESync(tiny(embed_dim=96)), vit)
    with pytest.raises(ValueError, match='needs 11 \\+ 2'):
        init_from_imagenet_mae(
            CAVMAESync(tiny(modality_depth=11, joint_depth=2, decoder_depth=1)), vit
        )
    with pytest.raises(FileNotFoundError, match='missing_mae.pth'):
        init_from_imagenet_mae(CAVMAESync(tiny()), tmp_path / 'missing_mae.pth')
