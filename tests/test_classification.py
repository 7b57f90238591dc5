"Classification: linear probe, frozen features, classifier evaluation, published numbers (the metrics themselves: test_metrics.py)."
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cavmae_sync.classification import linear_probe, extract_features, evaluate_classifier
from cavmae_sync.metrics import accuracy


def test_linear_probe_single_and_multi_label():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 2
    labels = torch.randint(0, 4, (400,), generator=gen)
    features = centres[labels] + torch.randn(400, 16, generator=gen) - 5
    result = linear_probe(features[:300], labels[:300], features[300:], F.one_hot(labels[300:], 4), multilabel=False, epochs=20, lr=1e-2)
    assert result.metric_name == 'accuracy' and result.metric > 90
    assert len(result.history) == 20 and result.history['test_metric'].notna().sum() >= 2
    torch.testing.assert_close(torch.tensor(result.metric), torch.tensor(accuracy(result.test_scores, labels[300:])))
    tags = (torch.rand(400, 5, generator=gen) < 0.3).float()
    features = tags @ torch.randn(5, 16, generator=gen) + 0.3 * torch.randn(400, 16, generator=gen)
    result = linear_probe(features[:300], tags[:300], features[300:], tags[300:], multilabel=True, epochs=20, lr=1e-2)
    assert result.metric_name == 'mAP' and result.metric > 85 and result.map_result is not None
    with pytest.raises(ValueError):
        linear_probe(features[:300], tags[:200], features[300:], tags[300:], multilabel=True, epochs=1)


class LabelledClips(Dataset):
    def __init__(self, config, n=5, frames=2, classes=3):
        self.config, self.n, self.frames, self.classes = config, n, frames, classes
    def __len__(self): return self.n
    def __getitem__(self, i):
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {'audio': torch.randn(self.frames, c.audio_length, c.num_mel_bins, generator=gen),
                'frames': torch.randn(self.frames, 3, c.image_size, c.image_size, generator=gen),
                'labels': F.one_hot(torch.tensor(i % self.classes), self.classes).float(), 'index': i}


def test_extract_features_are_frame_means_of_pooled_embeddings(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2)).eval()
    data = LabelledClips(model.config)
    features = extract_features(model, data, batch_size=2, progress=False, cache_path=tmp_path / 'f.pt')
    item = data[3]
    with torch.no_grad():
        out = model.encode(item['audio'], item['frames'])                 # the T frames of clip 3
    expected = torch.cat([out.audio_embedding.mean(0), out.video_embedding.mean(0)])
    torch.testing.assert_close(features.features[3], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(features.targets, torch.stack([data[i]['labels'] for i in range(5)]))
    assert torch.equal(extract_features(model, data, cache_path=tmp_path / 'f.pt').features, features.features)
    with pytest.raises(ValueError, match='another model'):
        extract_features(model, data, modality='audio', cache_path=tmp_path / 'f.pt')


def test_evaluate_classifier_scores_its_logits():
    from cavmae_sync.model import CAVMAESyncClassifier, tiny
    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=3)
    data = LabelledClips(classifier.config, n=6)
    classifier.train()
    evaluation = evaluate_classifier(classifier, data, multilabel=False, batch_size=4, progress=False)
    assert classifier.training                                                    # its mode is restored
    with torch.no_grad():
        expected = classifier.eval()(torch.stack([data[i]['audio'] for i in range(6)]), torch.stack([data[i]['frames'] for i in range(6)]))
    torch.testing.assert_close(evaluation.scores, expected, rtol=1e-4, atol=1e-5)
    assert evaluation.metric == accuracy(expected, torch.arange(6) % 3)
    with pytest.raises(ValueError, match='classes'):
        evaluate_classifier(classifier, LabelledClips(classifier.config, classes=4), multilabel=True, progress=False)


def test_evaluate_classifier_no_positives_rule_and_precision():
    from cavmae_sync.model import CAVMAESyncClassifier, tiny
    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=4)
    data = LabelledClips(classifier.config, n=6, classes=3)
    padded = [dict(data[i], labels=torch.cat([data[i]['labels'], torch.zeros(1)])) for i in range(6)]   # class 3: no positive
    with pytest.warns(UserWarning, match='No positive class found'):
        zero = evaluate_classifier(classifier, padded, multilabel=True, progress=False)
    excluded = evaluate_classifier(classifier, padded, multilabel=True, progress=False, no_positives='exclude')
    per_class = excluded.map_result.per_class[:3].double()
    assert math.isclose(zero.metric, float(per_class.sum()) / 4, rel_tol=1e-6) and math.isclose(excluded.metric, float(per_class.mean()), rel_tol=1e-6)
    assert torch.equal(evaluate_classifier(classifier, padded, multilabel=True, progress=False, precision='bf16',
                                           no_positives='exclude').scores, excluded.scores)          # CPU: fp32 whatever precision says
    with pytest.raises(ValueError, match='precision'):
        evaluate_classifier(classifier, padded, multilabel=True, progress=False, precision='fp8')
    with pytest.raises(ValueError, match='no_positives'):
        evaluate_classifier(classifier, padded, multilabel=True, progress=False, no_positives='drop')


def test_extract_features_precision_option(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2))
    data = LabelledClips(model.config, n=3)
    fp32 = extract_features(model, data, progress=False)
    assert torch.equal(extract_features(model, data, progress=False, precision='bf16').features, fp32.features)
    with pytest.raises(ValueError, match='precision'):
        extract_features(model, data, progress=False, precision='int8')


def test_reference_results_keep_both_files_and_their_sources():
    from cavmae_sync.classification import reference_results
    from cavmae_sync.config import project_root
    import pandas as pd
    baseline = pd.read_csv(project_root() / 'data' / 'cavmae_baseline_results.csv')       # the old file still reads as before
    assert {'model', 'task', 'dataset', 'metric', 'value', 'source'} <= set(baseline.columns)
    table = reference_results()
    assert len(table) == len(baseline) + 4 and table['source'].notna().all()
    sync = table[table['model'] == 'CAV-MAE Sync'].set_index(['dataset', 'task', 'metric'])['value']
    assert sync.to_dict() == {('audioset_20k', 'frozen_encoder', 'mAP'): 30.5, ('audioset_20k', 'frozen_encoder_audio_only', 'mAP'): 29.3,
                              ('audioset_20k', 'frozen_encoder_video_only', 'mAP'): 14.3, ('vggsound', 'frozen_encoder', 'accuracy'): 52.7}
    assert table[table['model'] == 'CAV-MAE Sync']['source'].str.contains('TG-DP').all()
    assert set(reference_results('audioset')['dataset']) <= {'audioset_20k', 'audioset_2m'}
