"""Count validation, covariate encoding and the stratified split."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from regvi.data import CovariateEncoder, CovariateKeys, count_matrix, stratified_split
from regvi.errors import ConfigError, DataError


def toy(n=20, g=5, values=None):
    X = np.random.default_rng(0).poisson(3, (n, g)).astype(np.float32) if values is None else values
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(["a", "b"] * (n // 2)),
            "dataset": ["d1", "d2"] * (n // 2),
            "kit": ["k1"] * n,
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(
        sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)])
    )


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda X: X * 0.5 + 0.25, "not whole numbers"),
        (lambda X: X - 10, "negative"),
        (lambda X: np.where(X > 4, np.nan, X), "NaN or infinite"),
        (lambda X: np.where(X > 4, np.inf, X), "NaN or infinite"),
        (lambda X: X * 0, "every count"),
    ],
)
def test_bad_counts_are_named(mutate, fragment):
    X = np.random.default_rng(0).poisson(3, (20, 5)).astype(np.float32)
    with pytest.raises(DataError, match=fragment):
        count_matrix(toy(values=mutate(X)))


def test_empty_and_duplicate_and_layer_errors():
    with pytest.raises(DataError, match="zero cells"):
        count_matrix(toy()[:0])
    a = toy()
    a.var_names = ["g0", "g0", "g1", "g2", "g3"]
    with pytest.raises(DataError, match="duplicate gene"):
        count_matrix(a)
    with pytest.raises(DataError, match="layer 'counts' not found"):
        count_matrix(toy(), layer="counts")


def test_batch_key_fans_out_and_conflicts_are_errors():
    keys = CovariateKeys.resolve(batch_key="batch")
    assert keys.ambient_covariate_keys == ["batch"]
    assert keys.dispersion_key == "batch" and keys.library_size_key == "batch"
    # the decoder is conditioned on the batch (and per-gene scaling follows it) unless the
    # user keeps it batch-free with an explicit empty list
    assert keys.encoder_covariate_keys == [] and keys.nn_conditioning_covariate_keys == ["batch"]
    assert keys.feature_scaling_covariate_keys == ["batch"]
    batch_free = CovariateKeys.resolve(batch_key="batch", nn_conditioning_covariate_keys=[])
    assert batch_free.nn_conditioning_covariate_keys == []
    assert batch_free.feature_scaling_covariate_keys == []
    own = CovariateKeys.resolve(batch_key="batch", nn_conditioning_covariate_keys=["kit"])
    assert own.nn_conditioning_covariate_keys == ["kit"]
    with pytest.raises(ConfigError, match="dispersion_key"):
        CovariateKeys.resolve(batch_key="batch", dispersion_key="x")
    with pytest.raises(ConfigError, match="same concept"):
        CovariateKeys.resolve(batch_key="batch", library_key="lane")


def test_purpose_keys_map_to_roles():
    keys = CovariateKeys.resolve(
        library_key="batch", dataset_key="dataset", technical_covariate_keys=["kit"]
    )
    assert keys.ambient_covariate_keys == ["batch"] and keys.library_size_key == "batch"
    assert keys.feature_scaling_covariate_keys == ["dataset", "kit"]
    only_library = CovariateKeys.resolve(library_key="batch")
    assert only_library.dataset_key is None
    assert only_library.feature_scaling_covariate_keys == ["batch"]
    explicit = CovariateKeys.resolve(
        dataset_key="dataset", feature_scaling_covariate_keys=["kit"], library_size_key="batch"
    )
    assert explicit.feature_scaling_covariate_keys == ["kit"]


def test_encoding_keeps_categories_and_offsets():
    a = toy()
    keys = CovariateKeys.resolve(
        batch_key="batch", feature_scaling_covariate_keys=["dataset", "kit"]
    )
    enc = CovariateEncoder(keys).fit(a.obs)
    codes = enc.transform(a.obs)
    assert enc.categories["batch"] == ["a", "b"]
    assert codes["ambient"].shape == (20, 1)
    # dataset has 2 categories, so kit codes are offset by 2
    assert set(codes["feature_scaling"][:, 1]) == {2}
    assert codes["dispersion"].tolist() == [0, 1] * 10
    restored = CovariateEncoder.from_dict(enc.to_dict())
    np.testing.assert_array_equal(restored.transform(a.obs)["ambient"], codes["ambient"])


def test_encoding_errors_name_the_problem():
    a = toy()
    enc = CovariateEncoder(CovariateKeys.resolve(batch_key="batch")).fit(a.obs)
    new = a.obs.copy()
    new["batch"] = ["a", "zzz"] * 10
    with pytest.raises(DataError, match="'zzz' not seen"):
        enc.transform(new)
    with pytest.raises(DataError, match="'nope'.*not found"):
        CovariateEncoder(CovariateKeys.resolve(batch_key="nope")).fit(a.obs)
    nan = a.obs.copy()
    nan["batch"] = nan["batch"].astype(object)
    nan.iloc[3, 0] = np.nan
    with pytest.raises(DataError, match="'batch' has 1 missing"):
        CovariateEncoder(CovariateKeys.resolve(batch_key="batch")).fit(nan)


def test_library_in_two_datasets_is_named():
    a = toy()
    a.obs["dataset"] = ["d1"] * 19 + ["d2"]  # library 'b' appears in d1 and d2
    keys = CovariateKeys.resolve(library_key="batch", dataset_key="dataset")
    with pytest.raises(DataError, match=r"'b' in \['d1', 'd2'\]"):
        CovariateEncoder(keys).fit(a.obs)


def test_stratified_split_keeps_each_library():
    strata = np.array([0] * 100 + [1] * 30 + [2] * 1)
    train, val = stratified_split(strata, 0.9, seed=0)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == strata.size
    assert (strata[val] == 0).sum() == 10 and (strata[val] == 1).sum() == 3
    assert (strata[val] == 2).sum() == 0  # a one-cell library stays in training
    again = stratified_split(strata, 0.9, seed=0)
    np.testing.assert_array_equal(again[1], val)
