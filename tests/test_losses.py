"Losses on hand-computed cases."

import math

import pytest
import torch

from cavmae_sync.losses import info_nce, masked_mse, normalize_patches


def test_masked_mse_counts_masked_patches_only():
    pred = torch.tensor([[[1.0, 1.0], [3.0, 5.0]], [[0.0, 0.0], [0.0, 2.0]]])
    target = torch.zeros(2, 2, 2)
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # masked patch errors: (9 + 25) / 2 = 17, 0, (0 + 4) / 2 = 2 -> mean over 3 masked patches
    assert torch.isclose(masked_mse(pred, target, mask), torch.tensor((17 + 0 + 2) / 3))
    assert masked_mse(pred, target, torch.zeros(2, 2)) == 0


def test_norm_pix_targets():
    target = torch.tensor([[[1.0, 3.0, 5.0]]])
    normed = normalize_patches(target)
    assert torch.allclose(
        normed, torch.tensor([[[-1.0, 0.0, 1.0]]]) / (4 + 1e-6) ** 0.5 * 2
    )  # mean 3, unbiased var 4
    assert torch.isclose(
        masked_mse(torch.zeros(1, 1, 3), target, torch.ones(1, 1), norm_pix=True),
        torch.tensor(2 / 3),
        atol=1e-5,
    )


def test_masked_mse_shape_errors():
    with pytest.raises(ValueError, match='target shape'):
        masked_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(ValueError, match='mask shape'):
        masked_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(2))


def test_info_nce_direction_and_accuracy():
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    video = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    a, v = audio / audio.norm(dim=1, keepdim=True), video / video.norm(dim=1, keepdim=True)
    sim = (a @ v.T / t).tolist()
    # single direction: for each video column j, softmax over the audio rows, take row j
    expected = (
        -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(3))) for j in range(3)) / 3
    )
    res = info_nce(audio, video, temperature=t)
    assert math.isclose(res.loss.item(), expected, rel_tol=1e-6)
    acc = sum(max(range(3), key=lambda i: sim[i][j]) == j for j in range(3)) / 3
    assert math.isclose(res.accuracy.item(), acc, rel_tol=1e-6)
    other = (
        -sum(sim[j][j] - math.log(sum(math.exp(sim[j][i]) for i in range(3))) for j in range(3)) / 3
    )
    assert not math.isclose(expected, other, rel_tol=1e-3)  # the two directions differ here
    both = info_nce(audio, video, temperature=t, bidirectional=True)
    assert math.isclose(both.loss.item(), (expected + other) / 2, rel_tol=1e-6)


def test_info_nce_perfect_pairs_and_errors():
    emb = torch.eye(4) * 3
    res = info_nce(emb, emb, 0.05)
    assert res.accuracy == 1 and math.isclose(
        res.loss.item(), -(20 - math.log(math.exp(20) + 3)), abs_tol=1e-6
    )
    with pytest.raises(ValueError, match='same shape'):
        info_nce(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match='temperature'):
        info_nce(emb, emb, 0.0)


def test_info_nce_is_float32_under_bf16():
    emb = torch.randn(8, 16).bfloat16()
    assert info_nce(emb, emb).loss.dtype == torch.float32
    a, v = torch.randn(32, 64), torch.randn(32, 64)
    reference = info_nce(a, v, 0.05)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = info_nce(a, v, 0.05)
    assert torch.equal(inside.loss, reference.loss) and torch.equal(
        inside.accuracy, reference.accuracy
    )
