r"""An atlas-like single-cell RNA count simulator that is *not* regvi's generative model.

It exists to benchmark batch integration (regvi against scvi-tools' SCVI) on data whose
structure neither model assumes: a lineage hierarchy of cell types, studies made of
libraries, compositions that differ by library, cell-type-specific batch effects, a per-study
gene-wise capture efficiency, ambient RNA mixed into every cell, several-fold depth
differences and gamma-Poisson noise whose dispersion follows a mean-dispersion trend. Only
numpy, scipy, pandas and anndata are used.

Notation: genes :math:`g = 1..G`, lineages :math:`a`, subtypes :math:`b`, types :math:`t`,
studies :math:`s`, libraries :math:`l` (each in exactly one study :math:`s(l)`), cells
:math:`c` (of type :math:`t(c)`, in library :math:`l(c)`). :math:`\mathcal N` is a normal,
:math:`U` a uniform, :math:`S \subset \{1..G\}` a gene set drawn uniformly without
replacement. Every draw comes from one ``numpy.random.default_rng(seed)`` stream in a fixed
order, so a seed fixes the data set.

1. **Lineage tree.** ``n_lineages`` lineages (level 1) :math:`\to` ``n_subtypes`` subtypes
   (level 2) :math:`\to` ``n_cell_types`` types (level 3). Every parent gets at least one
   child; the remaining children pick a parent with probabilities from a
   :math:`\mathrm{Dirichlet}(2\cdot\mathbf 1)` draw, so lineages differ in size as in an
   immune atlas. Stored as parent arrays ``lineage_of_subtype`` and ``subtype_of_type``.

2. **Gene baseline** (heavy-tailed): :math:`\beta_g \sim \mathcal N(0, 1.2^2)`, plus
   :math:`U(2, 4)` on a random 1% of genes (ribosomal / mitochondrial-like genes that take a
   large share of every cell's counts).

3. **Hierarchical programmes.** Type log-expression

   .. math:: \lambda_{tg} = \beta_g + A_{a(t)g} + B_{b(t)g} + T_{tg},

   where each node's effect is a signed effect on its own gene set plus "marker" genes that
   are switched on from the lower half of the baseline (so they are near-off elsewhere):

   =========  ======================  ==========  ==================  ==============
   level      signed-effect genes     sd          marker genes        marker boost
   =========  ======================  ==========  ==================  ==============
   lineage    8% of G                 1.2         1.0% of G (>= 3)    U(3, 6)
   subtype    4% of G                 0.8         0.4% of G (>= 2)    U(2, 4)
   type       1.5% of G               0.5         0.15% of G (>= 1)   U(1.5, 3)
   =========  ======================  ==========  ==================  ==============

   Siblings share :math:`A` and :math:`B` and so are similar; types in different lineages
   differ on every level.

4. **Within-type cell states.** :math:`K = 3` continuous programmes (cycling /
   interferon / stress-like) with sparse loadings :math:`W_{kg} \sim \mathcal N(0, 0.8^2)` on
   4% of genes; cell scores :math:`z_{ck} = m_{t(c)k} + \mathcal N(0, 0.5^2)` with type means
   :math:`m_{tk} \sim \mathcal N(0, 0.5^2)` (``obsm["programs"]``).

5. **Studies and libraries.** Every study gets
   :math:`\max(2, \lfloor n_{lib}/n_{study} \rfloor - 1)` libraries; the others go to
   uniformly drawn studies; libraries are numbered study by study.

6. **Composition.** Global abundance :math:`\pi^0_t \propto e^{\mathcal N(0, 0.8^2)}`, times
   0.05 for a random 10% of types (rare types). Each (study, type) is absent with probability
   ``study_absent_prob``; a type left in fewer than 2 studies is put back into random ones.
   Study composition :math:`\pi^s_t \propto \pi^0_t e^{\mathcal N(0, 0.5^2)}` over the present
   types. Each (library, type) of a present (study, type) is absent with probability
   ``library_absent_prob``. Library composition
   :math:`\pi^l \sim \mathrm{Dirichlet}(50\,\pi^{s(l)})` over the library's present types
   (concentration floored at 1e-3), so rare types are absent from many libraries by chance
   too. Guarantee: every type gets 2 anchor studies among its present ones, and
   ``ANCHOR_CELLS`` = 3 cells in one library of each, so every type has cells in at least 2
   studies. Library sizes: anchor cells + 20 + a multinomial share of the rest with
   :math:`\mathrm{Dirichlet}(4\cdot\mathbf 1)` weights; the remaining cells of a library are
   :math:`\mathrm{Multinomial}(\pi^l)`.

7. **Batch effects** (log scale, added to the cell's log-expression):

   - study :math:`\times` lineage: :math:`D_{s a g} \sim \mathcal N(0, \sigma_D^2)` on a
     gene set of 25% of genes per (study, lineage), :math:`\sigma_D` = ``batch_effect_sd``
     (0.4). The same study shifts different genes in different lineages, so the batch effect
     is cell-type-specific, not one global factor;
   - library: :math:`E_{lg} \sim \mathcal N(0, \sigma_E^2)` on all genes,
     :math:`\sigma_E` = ``library_effect_sd`` (0.1);
   - per-study gene scaling (technology / capture efficiency):
     :math:`\log\gamma_{sg} \sim \mathcal N(0, \sigma_\gamma^2)`, :math:`\sigma_\gamma` =
     ``gene_scaling_sd`` (0.35), and :math:`\mathcal N(0, (4\sigma_\gamma)^2)` on a random 3% of
     genes per study (strongly technology-dependent genes).

   The cell's own profile is

   .. math:: p_{cg} = \operatorname{softmax}_g\bigl(\lambda_{t(c)g} + z_c^\top W_{\cdot g}
             + D_{s(c)a(c)g} + E_{l(c)g} + \log\gamma_{s(c)g}\bigr).

8. **Ambient soup.** Library soup :math:`\sigma_{lg} = \frac{1}{n_l}\sum_{c \in l} p_{cg}`:
   the mean profile of the library's cells, i.e. weighted by the library's realised
   composition (what real soup is). Contamination :math:`\alpha_l` is log-uniform on
   ``contamination_range`` (uniform if its lower end is 0), one per library. The cell's
   observed profile is the mixture

   .. math:: q_{cg} = (1 - \alpha_{l(c)})\, p_{cg} + \alpha_{l(c)}\, \sigma_{l(c)g},

   so a fraction :math:`\alpha_l` of each cell's expected counts is soup.

9. **Depth.** Study medians :math:`M_s` log-spaced over ``depth_range`` (800 to 6000 UMIs),
   in a random study order. Library medians
   :math:`M_l = M_{s(l)} e^{\epsilon_l - \bar\epsilon_{s(l)}}`, :math:`\epsilon_l \sim
   \mathcal N(0, 0.3^2)` centred within the study. Type RNA content
   :math:`\kappa_t = e^{\mathcal N(0, 0.25^2)}` (log-centred). Cell depth
   :math:`d_c = \max\bigl(M_{l(c)} \kappa_{t(c)} e^{\mathcal N(0, 0.45^2)}, d_{\min}\bigr)`,
   :math:`d_{\min}` = ``min_depth`` (150); ``obs["depth"]`` holds :math:`d_c`, the planted
   expected total (the observed total is its noisy realisation).

10. **Counts.** Gene dispersion follows a mean-dispersion trend,
    :math:`\phi_g = \min\bigl((0.08 + 0.3/\bar\mu_g)\, e^{\mathcal N(0, 0.3^2)}, 20\bigr)`,
    with :math:`\bar\mu_g = \bar d\, \sum_t \pi^0_t \operatorname{softmax}(\lambda_t)_g` the
    gene's mean count at the geometric-mean study depth :math:`\bar d`. Counts are drawn as
    an explicit gamma-Poisson mixture

    .. math:: x_{cg} \sim \mathrm{Poisson}(d_c q_{cg} \, r_{cg}),\quad
              r_{cg} \sim \mathrm{Gamma}(\text{shape } 1/\phi_g, \text{scale } \phi_g),

    i.e. :math:`\mathbb E x = d_c q_{cg}`, :math:`\mathrm{Var}\, x = \mu + \phi_g \mu^2`.
    The depth floor makes empty cells practically impossible; it is checked.

Output: ``X`` CSR float32 counts, cells ordered library by library (shuffled within each);
``obs``: ``cell_type`` (level 3), ``cell_type_l2``, ``cell_type_l1``, ``library`` (copied to
``batch``), ``study`` as categoricals, ``contamination`` and ``depth``; ``obsm["programs"]``;
``uns["atlas_truth"]``: every planted parameter as plain arrays (writable to ``.h5ad``).
"""

from __future__ import annotations

import numbers

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["simulate_atlas"]

# Gene baseline
BASELINE_SD = 1.2
HIGH_GENE_FRACTION = 0.01
HIGH_GENE_BOOST = (2.0, 4.0)
# Hierarchy: (signed-effect gene fraction, sd, marker fraction, minimum markers, marker boost)
LEVELS = {
    "lineage": (0.08, 1.2, 0.010, 3, (3.0, 6.0)),
    "subtype": (0.04, 0.8, 0.004, 2, (2.0, 4.0)),
    "type": (0.015, 0.5, 0.0015, 1, (1.5, 3.0)),
}
# Within-type cell-state programmes
N_PROGRAMS = 3
PROGRAM_GENE_FRACTION = 0.04
PROGRAM_LOADING_SD = 0.8
PROGRAM_TYPE_SD = 0.5
PROGRAM_CELL_SD = 0.5
# Composition
ABUNDANCE_SD = 0.8
RARE_FRACTION = 0.10
RARE_FACTOR = 0.05
STUDY_COMPOSITION_SD = 0.5
LIBRARY_CONCENTRATION = 50.0
DIRICHLET_FLOOR = 1e-3
LIBRARY_SIZE_CONCENTRATION = 4.0
MIN_EXTRA_CELLS_PER_LIBRARY = 20
ANCHOR_STUDIES = 2
ANCHOR_CELLS = 3
# Batch effects
STUDY_LINEAGE_GENE_FRACTION = 0.25
STRONG_SCALING_FRACTION = 0.03
STRONG_SCALING_FACTOR = 4.0
# Depth
LIBRARY_DEPTH_SD = 0.3
TYPE_CONTENT_SD = 0.25
CELL_DEPTH_SD = 0.45
# Dispersion trend phi = (a + b / mean) * exp(N(0, sd^2)), capped
DISPERSION_A = 0.08
DISPERSION_B = 0.3
DISPERSION_SD = 0.3
DISPERSION_MAX = 20.0


def _softmax_rows(eta: np.ndarray) -> np.ndarray:
    """Row-wise :math:`e^{\\eta_{g}} / \\sum_h e^{\\eta_h}`, in place on ``eta``."""
    eta -= eta.max(axis=1, keepdims=True)
    np.exp(eta, out=eta)
    eta /= eta.sum(axis=1, keepdims=True)
    return eta


def _assign_parents(rng: np.random.Generator, n_children: int, n_parents: int) -> np.ndarray:
    """Sorted parent index per child; each parent gets >= 1 child, the rest Dirichlet(2)-weighted."""
    weights = rng.dirichlet(np.full(n_parents, 2.0))
    extra = rng.choice(n_parents, size=n_children - n_parents, p=weights)
    return np.sort(np.concatenate([np.arange(n_parents), extra]))


def _random_sets(rng: np.random.Generator, n_sets: int, pool: np.ndarray, size: int) -> np.ndarray:
    """``n_sets`` rows of ``size`` distinct entries of ``pool``, drawn uniformly."""
    order = np.argsort(rng.random((n_sets, pool.size)), axis=1)[:, :size]
    return pool[order]


def _level_effects(
    rng: np.random.Generator, n_nodes: int, n_genes: int, low_genes: np.ndarray, level: str
) -> np.ndarray:
    """Effects (nodes x genes): signed N(0, sd^2) on a gene set plus marker boosts."""
    frac, sd, marker_frac, min_markers, (lo, hi) = LEVELS[level]
    effects = np.zeros((n_nodes, n_genes))
    n_signed = max(1, round(frac * n_genes))
    genes = _random_sets(rng, n_nodes, np.arange(n_genes), n_signed)
    rows = np.repeat(np.arange(n_nodes), n_signed)
    effects[rows, genes.ravel()] = rng.normal(0.0, sd, size=n_nodes * n_signed)
    n_markers = min(max(min_markers, round(marker_frac * n_genes)), low_genes.size)
    markers = _random_sets(rng, n_nodes, low_genes, n_markers)
    rows = np.repeat(np.arange(n_nodes), n_markers)
    effects[rows, markers.ravel()] = rng.uniform(lo, hi, size=n_nodes * n_markers)
    return effects


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_range(
    name: str, value: object, lower: float, upper: float | None
) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lower <= lo <= hi):
        raise ValueError(f"{name} must satisfy {lower} <= low <= high, got {value!r}")
    if upper is not None and hi >= upper:
        raise ValueError(f"{name} high end must be < {upper}, got {hi}")
    return lo, hi


def _check_float(name: str, value: object, lower: float, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < lower or (upper is not None and value > upper):
        bound = f"in [{lower}, {upper}]" if upper is not None else f">= {lower}"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def simulate_atlas(
    n_cells: int = 8000,
    n_genes: int = 2000,
    n_cell_types: int = 120,
    n_studies: int = 5,
    n_libraries: int = 24,
    seed: int = 0,
    *,
    n_lineages: int = 6,
    n_subtypes: int = 24,
    depth_range: tuple[float, float] = (800.0, 6000.0),
    contamination_range: tuple[float, float] = (0.01, 0.15),
    batch_effect_sd: float = 0.4,
    library_effect_sd: float = 0.1,
    gene_scaling_sd: float = 0.35,
    study_absent_prob: float = 0.15,
    library_absent_prob: float = 0.15,
    min_depth: float = 150.0,
    chunk_size: int = 2048,
) -> ad.AnnData:
    r"""Simulate an atlas-like count matrix with planted hierarchy, batches, soup and depth.

    The generative process (formulas and constants) is in the module docstring; in short

    .. math::

        x_{cg} \sim \mathrm{Poisson}\bigl(d_c\,[(1-\alpha_l) p_{cg} + \alpha_l \sigma_{lg}]
        \, r_{cg}\bigr),\; r_{cg} \sim \mathrm{Gamma}(1/\phi_g, \phi_g),

    with :math:`p_c = \operatorname{softmax}(\lambda_{t} + z_c^\top W + D_{s a} + E_l +
    \log\gamma_s)`, :math:`\sigma_l` the mean :math:`p` of library :math:`l`'s cells and
    :math:`\phi_g = 0.08 + 0.3/\bar\mu_g` (times log-normal noise).

    Parameters
    ----------
    n_cells, n_genes
        Matrix shape. ``n_cells`` must cover the anchor cells
        (``2 * 3 * n_cell_types``) plus 20 per library.
    n_cell_types, n_subtypes, n_lineages
        Tree sizes, ``n_cell_types >= n_subtypes >= n_lineages >= 2``.
    n_studies, n_libraries
        ``n_studies >= 2``; ``n_libraries >= 2 * n_studies`` (>= 2 libraries per study).
    seed
        Non-negative integer; the same seed gives the same data set.
    depth_range
        (lowest, highest) study median expected UMIs per cell, ``0 < low <= high``.
    contamination_range
        Per-library ambient fraction range, ``0 <= low <= high < 1``.
    batch_effect_sd, library_effect_sd, gene_scaling_sd
        Log-scale sds of the study x lineage effect, the library effect and the per-study gene
        scaling (0 switches an effect off).
    study_absent_prob, library_absent_prob
        Probability that a type is planted absent from a study / from a library of a study
        where it is present, in ``[0, 1)``.
    min_depth
        Floor of the expected depth :math:`d_c`, ``>= 1``.
    chunk_size
        Cells per block when drawing counts (bounds memory at about ``3 * chunk_size * n_genes``
        doubles).

    Returns
    -------
    anndata.AnnData
        Counts in ``X`` (CSR float32), labels and planted per-cell values in ``obs``, cell
        programme scores in ``obsm["programs"]`` and planted parameters in
        ``uns["atlas_truth"]``.

    Raises
    ------
    ValueError
        On an invalid argument.
    """
    n_cells = _check_int("n_cells", n_cells, 1)
    n_genes = _check_int("n_genes", n_genes, 50)
    n_lineages = _check_int("n_lineages", n_lineages, 2)
    n_subtypes = _check_int("n_subtypes", n_subtypes, n_lineages)
    n_types = _check_int("n_cell_types", n_cell_types, n_subtypes)
    n_studies = _check_int("n_studies", n_studies, ANCHOR_STUDIES)
    n_libraries = _check_int("n_libraries", n_libraries, 2 * n_studies)
    seed = _check_int("seed", seed, 0)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    depth_lo, depth_hi = _check_range("depth_range", depth_range, 0.0, None)
    if depth_lo <= 0:
        raise ValueError(f"depth_range low end must be > 0, got {depth_lo}")
    cont_lo, cont_hi = _check_range("contamination_range", contamination_range, 0.0, 1.0)
    batch_effect_sd = _check_float("batch_effect_sd", batch_effect_sd, 0.0)
    library_effect_sd = _check_float("library_effect_sd", library_effect_sd, 0.0)
    gene_scaling_sd = _check_float("gene_scaling_sd", gene_scaling_sd, 0.0)
    study_absent_prob = _check_float("study_absent_prob", study_absent_prob, 0.0, 0.999)
    library_absent_prob = _check_float("library_absent_prob", library_absent_prob, 0.0, 0.999)
    min_depth = _check_float("min_depth", min_depth, 1.0)
    needed = ANCHOR_STUDIES * ANCHOR_CELLS * n_types + MIN_EXTRA_CELLS_PER_LIBRARY * n_libraries
    if n_cells < needed:
        raise ValueError(
            f"n_cells={n_cells} is too small: {n_types} types x {ANCHOR_STUDIES} studies x "
            f"{ANCHOR_CELLS} anchor cells + {MIN_EXTRA_CELLS_PER_LIBRARY} per library need "
            f">= {needed}"
        )

    rng = np.random.default_rng(seed)
    G = n_genes

    # 1. tree
    lineage_of_subtype = _assign_parents(rng, n_subtypes, n_lineages)
    subtype_of_type = _assign_parents(rng, n_types, n_subtypes)
    lineage_of_type = lineage_of_subtype[subtype_of_type]

    # 2. gene baseline
    baseline = rng.normal(0.0, BASELINE_SD, size=G)
    n_high = max(1, round(HIGH_GENE_FRACTION * G))
    high = rng.choice(G, size=n_high, replace=False)
    baseline[high] += rng.uniform(*HIGH_GENE_BOOST, size=n_high)
    low_genes = np.flatnonzero(baseline < np.median(baseline))

    # 3. hierarchical programmes
    lineage_eff = _level_effects(rng, n_lineages, G, low_genes, "lineage")
    subtype_eff = _level_effects(rng, n_subtypes, G, low_genes, "subtype")
    type_eff = _level_effects(rng, n_types, G, low_genes, "type")
    type_log_expr = (
        baseline + lineage_eff[lineage_of_type] + subtype_eff[subtype_of_type] + type_eff
    )

    # 4. cell-state programmes (loadings, type means)
    n_prog_genes = max(1, round(PROGRAM_GENE_FRACTION * G))
    loadings = np.zeros((N_PROGRAMS, G))
    prog_genes = _random_sets(rng, N_PROGRAMS, np.arange(G), n_prog_genes)
    loadings[np.repeat(np.arange(N_PROGRAMS), n_prog_genes), prog_genes.ravel()] = rng.normal(
        0.0, PROGRAM_LOADING_SD, size=N_PROGRAMS * n_prog_genes
    )
    program_type_mean = rng.normal(0.0, PROGRAM_TYPE_SD, size=(n_types, N_PROGRAMS))

    # 5. studies and libraries
    per_study = max(2, n_libraries // n_studies - 1)
    study_of_library = np.sort(
        np.concatenate(
            [
                np.repeat(np.arange(n_studies), per_study),
                rng.integers(0, n_studies, size=n_libraries - per_study * n_studies),
            ]
        )
    )

    # 6. composition
    abundance = np.exp(rng.normal(0.0, ABUNDANCE_SD, size=n_types))
    n_rare = round(RARE_FRACTION * n_types)
    rare = rng.choice(n_types, size=n_rare, replace=False)
    abundance[rare] *= RARE_FACTOR
    abundance /= abundance.sum()
    study_present = rng.random((n_studies, n_types)) >= study_absent_prob
    for t in np.flatnonzero(study_present.sum(axis=0) < ANCHOR_STUDIES):
        missing = ANCHOR_STUDIES - study_present[:, t].sum()
        absent = np.flatnonzero(~study_present[:, t])
        study_present[rng.choice(absent, size=missing, replace=False), t] = True
    study_comp = abundance * np.exp(rng.normal(0.0, STUDY_COMPOSITION_SD, (n_studies, n_types)))
    study_comp *= study_present
    study_comp /= study_comp.sum(axis=1, keepdims=True)
    lib_present = study_present[study_of_library] & (
        rng.random((n_libraries, n_types)) >= library_absent_prob
    )
    fixed = np.zeros((n_libraries, n_types), dtype=np.int64)
    for t in range(n_types):
        anchors = rng.choice(np.flatnonzero(study_present[:, t]), ANCHOR_STUDIES, replace=False)
        for s in anchors:
            lib = rng.choice(np.flatnonzero(study_of_library == s))
            lib_present[lib, t] = True
            fixed[lib, t] += ANCHOR_CELLS
    for lib in np.flatnonzero(~lib_present.any(axis=1)):
        lib_present[lib, np.argmax(study_comp[study_of_library[lib]])] = True
    lib_comp = np.zeros((n_libraries, n_types))
    for lib in range(n_libraries):
        present = np.flatnonzero(lib_present[lib])
        alpha = LIBRARY_CONCENTRATION * study_comp[study_of_library[lib], present]
        lib_comp[lib, present] = rng.dirichlet(np.maximum(alpha, DIRICHLET_FLOOR))
    base = fixed.sum(axis=1) + MIN_EXTRA_CELLS_PER_LIBRARY
    share = rng.dirichlet(np.full(n_libraries, LIBRARY_SIZE_CONCENTRATION))
    lib_size = base + rng.multinomial(n_cells - base.sum(), share)
    type_counts = fixed + np.stack(
        [
            rng.multinomial(lib_size[lib] - fixed[lib].sum(), lib_comp[lib])
            for lib in range(n_libraries)
        ]
    )
    cell_library = np.repeat(np.arange(n_libraries), lib_size)
    cell_type = np.concatenate(
        [
            rng.permutation(np.repeat(np.arange(n_types), type_counts[lib]))
            for lib in range(n_libraries)
        ]
    )
    cell_study = study_of_library[cell_library]
    cell_lineage = lineage_of_type[cell_type]
    programs = program_type_mean[cell_type] + rng.normal(
        0.0, PROGRAM_CELL_SD, size=(n_cells, N_PROGRAMS)
    )

    # 7. batch effects
    study_lineage_eff = np.zeros((n_studies, n_lineages, G))
    n_sl = max(1, round(STUDY_LINEAGE_GENE_FRACTION * G))
    sl_genes = _random_sets(rng, n_studies * n_lineages, np.arange(G), n_sl)
    study_lineage_eff.reshape(n_studies * n_lineages, G)[
        np.repeat(np.arange(n_studies * n_lineages), n_sl), sl_genes.ravel()
    ] = rng.normal(0.0, batch_effect_sd, size=n_studies * n_lineages * n_sl)
    library_eff = rng.normal(0.0, library_effect_sd, size=(n_libraries, G))
    log_scaling = rng.normal(0.0, gene_scaling_sd, size=(n_studies, G))
    strong = rng.random((n_studies, G)) < STRONG_SCALING_FRACTION
    log_scaling[strong] = rng.normal(0.0, STRONG_SCALING_FACTOR * gene_scaling_sd, strong.sum())

    # 8. contamination per library
    if cont_lo > 0:
        contamination = np.exp(rng.uniform(np.log(cont_lo), np.log(cont_hi), n_libraries))
    else:
        contamination = rng.uniform(cont_lo, cont_hi, n_libraries)

    # 9. depth
    study_depth = np.exp(np.linspace(np.log(depth_lo), np.log(depth_hi), n_studies))
    study_depth = study_depth[rng.permutation(n_studies)]
    lib_log = rng.normal(0.0, LIBRARY_DEPTH_SD, n_libraries)
    for s in range(n_studies):
        in_s = study_of_library == s
        lib_log[in_s] -= lib_log[in_s].mean()
    lib_depth = study_depth[study_of_library] * np.exp(lib_log)
    type_content = rng.normal(0.0, TYPE_CONTENT_SD, n_types)
    type_content = np.exp(type_content - type_content.mean())
    depth = lib_depth[cell_library] * type_content[cell_type]
    depth *= np.exp(rng.normal(0.0, CELL_DEPTH_SD, n_cells))
    depth = np.maximum(depth, min_depth)

    # 10. dispersion trend
    ref_profile = abundance @ _softmax_rows(type_log_expr.copy())
    ref_mean = np.exp(np.log(study_depth).mean()) * ref_profile
    dispersion = (DISPERSION_A + DISPERSION_B / ref_mean) * np.exp(
        rng.normal(0.0, DISPERSION_SD, G)
    )
    dispersion = np.minimum(dispersion, DISPERSION_MAX)
    gamma_shape = 1.0 / dispersion

    def profiles(cells: np.ndarray) -> np.ndarray:
        eta = type_log_expr[cell_type[cells]] + programs[cells] @ loadings
        eta += study_lineage_eff[cell_study[cells], cell_lineage[cells]]
        eta += library_eff[cell_library[cells]] + log_scaling[cell_study[cells]]
        return _softmax_rows(eta)

    soup = np.zeros((n_libraries, G))
    blocks: list[sp.csr_matrix] = []
    starts = np.concatenate([[0], np.cumsum(lib_size)])
    for lib in range(n_libraries):
        chunks = [
            np.arange(a, min(a + chunk_size, starts[lib + 1]))
            for a in range(starts[lib], starts[lib + 1], chunk_size)
        ]
        cached = profiles(chunks[0]) if len(chunks) == 1 else None
        for cells in chunks:
            soup[lib] += (cached if cached is not None else profiles(cells)).sum(axis=0)
        soup[lib] /= lib_size[lib]
        a = contamination[lib]
        for cells in chunks:
            p = cached if cached is not None else profiles(cells)
            mu = depth[cells, None] * ((1.0 - a) * p + a * soup[lib])
            rate = rng.standard_gamma(np.broadcast_to(gamma_shape, mu.shape)) * dispersion
            blocks.append(sp.csr_matrix(rng.poisson(mu * rate).astype(np.float32)))
    X = sp.vstack(blocks, format="csr", dtype=np.float32)
    totals = np.asarray(X.sum(axis=1)).ravel()
    if not (totals > 0).all():
        raise RuntimeError(f"{int((totals == 0).sum())} cells drew zero counts despite the floor")

    lineage_names = [f"L{a}" for a in range(n_lineages)]
    subtype_names = [f"L{lineage_of_subtype[b]}.S{b:02d}" for b in range(n_subtypes)]
    type_names = [f"{subtype_names[subtype_of_type[t]]}.T{t:03d}" for t in range(n_types)]
    study_names = [f"study{s}" for s in range(n_studies)]
    library_names = [
        f"{study_names[study_of_library[lib]]}_lib{lib:02d}" for lib in range(n_libraries)
    ]

    def categorical(codes: np.ndarray, names: list[str]) -> pd.Categorical:
        return pd.Categorical.from_codes(codes, categories=names)

    obs = pd.DataFrame(
        {
            "cell_type": categorical(cell_type, type_names),
            "cell_type_l2": categorical(subtype_of_type[cell_type], subtype_names),
            "cell_type_l1": categorical(cell_lineage, lineage_names),
            "library": categorical(cell_library, library_names),
            "batch": categorical(cell_library, library_names),
            "study": categorical(cell_study, study_names),
            "contamination": contamination[cell_library],
            "depth": depth,
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{g}" for g in range(G)]))
    truth = {
        "lineage_of_subtype": lineage_of_subtype,
        "subtype_of_type": subtype_of_type,
        "lineage_of_type": lineage_of_type,
        "study_of_library": study_of_library,
        "gene_baseline": baseline,
        "lineage_effect": lineage_eff,
        "subtype_effect": subtype_eff,
        "type_effect": type_eff,
        "type_log_expression": type_log_expr,
        "program_loadings": loadings,
        "program_type_mean": program_type_mean,
        "abundance": abundance,
        "rare_types": np.sort(rare),
        "study_present": study_present,
        "library_present": lib_present,
        "study_composition": study_comp,
        "library_composition": lib_comp,
        "library_type_counts": type_counts,
        "study_lineage_effect": study_lineage_eff,
        "library_effect": library_eff,
        "study_gene_scaling": np.exp(log_scaling),
        "contamination": contamination,
        "soup": soup,
        "study_median_depth": study_depth,
        "library_median_depth": lib_depth,
        "type_rna_content": type_content,
        "dispersion": dispersion,
        "seed": seed,
    }
    return ad.AnnData(
        X=X,
        obs=obs,
        var=var,
        obsm={"programs": programs},
        uns={"atlas_truth": truth},
    )
