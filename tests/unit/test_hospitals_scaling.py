"""The hospitals example scales its features with public constants, no private statistic."""

from __future__ import annotations

import numpy as np

from examples.hospitals import app


def test_a_hospitals_scaling_does_not_change_when_one_record_is_removed():
    # Arrange: hospital-c's training records, and the same hospital without its first one
    from sklearn.datasets import load_breast_cancer

    inputs = load_breast_cancer().data.astype(np.float32)
    train_x, _, _, _ = app.hospital_split(2)
    rows = [
        int(np.flatnonzero((app.scale_features(inputs) == row).all(axis=1))[0]) for row in train_x
    ]
    # Act
    full = app.scale_features(inputs[rows])
    neighbour = app.scale_features(inputs[rows[1:]])
    # Assert: every other record is scaled exactly as before (the old per-hospital
    # standardisation moved every one of them), and only public constants are used
    np.testing.assert_array_equal(full[1:], neighbour)
    low, high = np.array(app.FEATURE_RANGES).T
    np.testing.assert_allclose(app.scale_features(np.array([low, high])), [[-2] * 30, [2] * 30])
    assert np.abs(train_x).max() <= 2.0


def test_the_old_standardisation_would_have_failed_this_check():
    # A control: scaling by the records' own mean and std moves every other record.
    from sklearn.datasets import load_breast_cancer

    inputs = load_breast_cancer().data[:100]

    def standardise(x):
        return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)

    assert not np.allclose(standardise(inputs)[1:], standardise(inputs[1:]))
