"""Poisson sampling over records and physical chunks that keep records whole."""

from __future__ import annotations

import numpy as np
import pytest

from mammodp.errors import PrivacyError
from mammodp.privacy.sampler import PoissonSampler, split_physical, steps_per_epoch


def test_batches_are_poisson_samples_of_records():
    n, q, draws = 1000, 0.05, 400
    sampler = PoissonSampler(np.arange(n), q, seed=0)
    counts = np.zeros(n)
    sizes = []
    for _ in range(draws):
        idx = sampler.sample()
        assert np.unique(idx).size == idx.size
        counts[idx] += 1
        sizes.append(idx.size)
    sizes = np.asarray(sizes)
    # batch size ~ Binomial(n, q): mean q n = 50, sd ~ 6.9; the batches really vary
    assert abs(sizes.mean() - q * n) < 5 * np.sqrt(n * q * (1 - q) / draws)
    assert sizes.std() > 3 and sizes.min() < q * n < sizes.max()
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.3)
    # each record's inclusion count ~ Binomial(draws, q): mean 20, sd 4.36
    sd = np.sqrt(draws * q * (1 - q))
    assert np.all(np.abs(counts - draws * q) < 6 * sd)
    assert counts.var() == pytest.approx(draws * q * (1 - q), rel=0.25)  # fixed-size batches would differ


def test_patient_unit_samples_patients_with_all_their_patches():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i:03d}" for i in range(60)], rng.integers(1, 5, size=60))
    rng.shuffle(patients)
    sampler = PoissonSampler(patients, 0.2, seed=1)
    assert sampler.n_records == 60 and sampler.n_samples == patients.size
    assert sampler.expected_batch_size == pytest.approx(12.0)
    seen = set()
    for _ in range(50):
        idx = sampler.sample()
        chosen = set(patients[idx])
        seen |= chosen
        for p in chosen:  # all or nothing per patient
            assert set(np.flatnonzero(patients == p)) <= set(idx.tolist())
        assert len(idx) == sum((patients == p).sum() for p in chosen)
    assert len(seen) == 60


def test_steps_per_epoch_and_empty_batches():
    assert steps_per_epoch(1 / 9) == 9 and steps_per_epoch(0.3) == 3 and steps_per_epoch(1.0) == 1
    sampler = PoissonSampler(np.arange(5), 0.05, seed=0)  # P(empty) = 0.77
    sizes = [sampler.sample().size for _ in range(50)]
    assert 0 in sizes and max(sizes) > 0
    with pytest.raises(PrivacyError):
        PoissonSampler(np.arange(5), 1.5)


def test_sampler_state_resumes_the_same_batches():
    a = PoissonSampler(np.arange(100), 0.1, seed=3)
    for _ in range(4):
        a.sample()
    state = a.state_dict()
    rest = [a.sample().tolist() for _ in range(5)]
    b = PoissonSampler(np.arange(100), 0.1, seed=999)
    b.load_state_dict(state)
    assert [b.sample().tolist() for _ in range(5)] == rest
    assert b.batches_drawn == a.batches_drawn == 9
    with pytest.raises(PrivacyError):
        PoissonSampler(np.arange(50), 0.1).load_state_dict(state)


def test_os_seeded_samplers_differ():
    a, b = PoissonSampler(np.arange(1000), 0.5), PoissonSampler(np.arange(1000), 0.5)
    assert a.sample().tolist() != b.sample().tolist()


def test_physical_chunks_never_split_a_record():
    records = np.array([4, 4, 1, 9, 9, 9, 2, 1, 4, 7, 7, 7, 7, 7, 3])
    chunks = split_physical(records, 4)
    covered = np.sort(np.concatenate(chunks))
    assert covered.tolist() == list(range(records.size))
    owner = {}
    for c, pos in enumerate(chunks):
        for r in set(records[pos].tolist()):
            assert r not in owner, f"record {r} split across chunks"
            owner[r] = c
        # only a record larger than the physical batch (record 7: 5 samples) may exceed it
        assert len(pos) <= 4 or set(records[pos].tolist()) == {7}
    assert split_physical(np.array([], dtype=np.int64), 4) == []
    assert [len(c) for c in split_physical(np.arange(10), 4)] == [4, 4, 2]


def test_one_sample_per_record_gives_the_records_samples_in_record_order():
    # The fast path (one gather) must hand out exactly what the per-record slices would.
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.array([f"R{i:03d}" for i in range(200)]))  # one sample each, shuffled
    sampler = PoissonSampler(ids, 0.1, seed=2)
    twin = PoissonSampler(ids, 0.1, seed=2)
    twin.one_per_record = False  # the general path, same coins
    assert sampler.one_per_record and not PoissonSampler(np.repeat(ids[:10], 2), 0.5).one_per_record
    for _ in range(20):
        idx, ref = sampler.sample(), twin.sample()
        assert idx.dtype == np.int64 and np.array_equal(idx, ref)
        assert np.all(np.diff(sampler.record_of_sample[idx]) > 0)  # grouped by record, ascending
