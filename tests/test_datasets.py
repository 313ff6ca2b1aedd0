"""accel.demo.datasets.moving_digits: reproducible clips, split by source image, sources reported."""
import torch
from sklearn.datasets import load_digits

from accel.demo.datasets import moving_digits


def test_moving_digits_reports_sources_and_keeps_images_apart(seed):
    train, test = moving_digits(num_frames=3, canvas=(20, 20), sequences_per_image=2, seed=seed)
    target = torch.from_numpy(load_digits().target)
    for split in (train, test):
        assert split.sources.shape == split.labels.shape and split.sources.dtype == torch.int64
        assert torch.equal(split.labels, target[split.sources])  # each label is its source image's
        assert (split.sources.unique(return_counts=True)[1] == 2).all()  # every image gives 2 clips
    assert not set(train.sources.tolist()) & set(test.sources.tolist())
    assert len(train) + len(test) == 2 * len(target)
    again, _ = moving_digits(num_frames=3, canvas=(20, 20), sequences_per_image=2, seed=seed)
    assert torch.equal(again.inputs, train.inputs) and torch.equal(again.sources, train.sources)
