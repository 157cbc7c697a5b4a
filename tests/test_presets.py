import pytest

from spgd_jax import DPSConfig, SPGDConfig, operators
from spgd_jax.samplers import presets


def test_every_task_has_spgd_and_dps_defaults():
    for task in operators.TASKS:
        spgd = presets.spgd_config(task)
        assert isinstance(spgd, SPGDConfig) and (spgd.steps, spgd.warmup, spgd.beta) == (100, 5, 0.9)
        tuned = presets.TUNED_SPGD.get(task, {})
        assert spgd.lr == tuned.get("lr", presets.PAPER_LR[task])
        assert spgd.lr_min_ratio == tuned.get("lr_min_ratio", 0.01)
        dps = presets.dps_config(task)
        assert isinstance(dps, DPSConfig) and dps.steps == spgd.steps * spgd.warmup  # equal NFEs
        assert dps.zeta == presets.TUNED_ZETA.get(task, presets.DPS_ZETA[task])


def test_paper_learning_rates():
    assert (presets.PAPER_LR["inpaint"], presets.PAPER_LR["gauss_deblur"], presets.PAPER_LR["sr4"]) == (2.5, 1.5, 8.0)


def test_overrides_apply_and_none_keeps_the_default():
    config = presets.spgd_config("sr4", steps=20, lr=None, adm="off")
    assert (config.steps, config.lr, config.adm) == (20, presets.spgd_config("sr4").lr, "off")


def test_unknown_task_and_setting_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'denoise'"):
        presets.spgd_config("denoise")
    with pytest.raises(ValueError, match="unknown setting.*momentum.*SPGDConfig takes"):
        presets.spgd_config("sr4", momentum=0.9)


def test_tuned_values_only_for_the_default_prior():
    tuned = presets.spgd_config("gauss_deblur")
    assert (tuned.lr, tuned.lr_min_ratio) == tuple(presets.TUNED_SPGD["gauss_deblur"][k] for k in ("lr", "lr_min_ratio"))
    paper = presets.spgd_config("gauss_deblur", tuned=False)
    assert (paper.lr, paper.lr_min_ratio) == (presets.PAPER_LR["gauss_deblur"], 0.01)
    assert presets.dps_config("inpaint", tuned=False).zeta == presets.DPS_ZETA["inpaint"]
    assert presets.dps_config("inpaint").zeta == presets.TUNED_ZETA["inpaint"]


def test_overrides_win_over_tuned_values():
    config = presets.spgd_config("gauss_deblur", lr=0.3, lr_min_ratio=0.5)
    assert (config.lr, config.lr_min_ratio) == (0.3, 0.5)


def test_box_inpainting_and_hdr_defaults_stay_below_their_stability_limits():
    """benchmarks/results/task_probe.md: box inpainting's warm-up grows the residual once lr > 1 / lambda
    = 1.35 (it diverged at the paper's 2.5); HDR needs a small constant rate from sigma_max 10."""
    from spgd_jax.samplers import presets

    box = presets.spgd_config("inpaint_box")
    assert box.lr < 1 / 0.74 and presets.spgd_config("inpaint_box", tuned=False).lr == 2.5
    hdr = presets.spgd_config("hdr")
    assert (hdr.lr, hdr.lr_min_ratio, hdr.sigma_max) == (0.1, 1.0, 10.0)
    assert set(presets.UNSUPPORTED_BY_DEFAULT_PRIOR) == {"phase_retrieval"}


def test_every_restoring_sampler_has_a_config_for_every_core_task():
    from spgd_jax.samplers import SAMPLERS

    for name, sampler in SAMPLERS.items():
        if not sampler.conditional:
            continue
        for task in ("inpaint", "gauss_deblur", "motion_deblur", "sr4"):
            for tuned in (True, False):
                config = presets.config(name, task, tuned)
                assert type(config) is sampler.config_type
                expected = {**sampler.paper.get(task, {}), **(sampler.tuned.get(task, {}) if tuned else {})}
                assert {k: getattr(config, k) for k in expected} == expected
    with pytest.raises(ValueError, match="unknown sampler 'ddim'; choose one of spgd, dps"):
        presets.config("ddim", "sr4")
