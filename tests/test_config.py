import re

import pytest

from pneumoseg.config import ConfigError, load_config, parse_overrides, save_config


@pytest.fixture
def base(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(
        "exp: base\nseed: 1\n"
        "train:\n  lr: 0.001\n  epochs: 3\n  amp: true\n  size: [256, 256]\n  weights: null\n"
        "model:\n  arch: unet\n"
    )
    return p


def test_experiment_merges_and_names_run(base, tmp_path):
    exp = tmp_path / "my_exp.yaml"
    exp.write_text("train:\n  lr: 1\n")
    cfg = load_config(exp, base=base)
    assert cfg["train"] == {
        "lr": 1.0,
        "epochs": 3,
        "amp": True,
        "size": [256, 256],
        "weights": None,
    }
    assert isinstance(cfg["train"]["lr"], float)
    assert cfg["exp"] == "my_exp"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.lr=1e-4", 1e-4),
        ("train.epochs=7", 7),
        ("train.amp=false", False),
        ("train.size=[64, 64]", [64, 64]),
        ("train.weights=x/y.pt", "x/y.pt"),
        ("model.arch=se_resnext50_32x4d", "se_resnext50_32x4d"),
    ],
)
def test_overrides(base, override, expected):
    cfg = load_config(None, [override], base=base)
    section, key = override.split("=")[0].split(".")
    assert cfg[section][key] == expected


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "train.lrr=1",
            r"unknown key 'train.lrr'. Valid keys here: amp, epochs, lr, size, weights",
        ),
        ("trian.lr=1", r"unknown key 'trian'"),
        ("train.epochs=1.5", r"'train.epochs' must be int"),
        ("train.amp=1", r"'train.amp' must be bool"),
        ("train.lr=fast", r"'train.lr' must be float"),
        ("train=3", r"'train' is a section"),
        ("train.lr", r"must look like section.key=value"),
    ],
)
def test_override_errors(base, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], base=base)


def test_experiment_typo_names_file(base, tmp_path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("model:\n  archh: fpn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.archh'"):
        load_config(exp, base=base)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_roundtrip(base, tmp_path):
    cfg = load_config(None, ["train.lr=0.5"], base=base)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out, base=base) | {"exp": "base"} == cfg


def test_repo_base_config_loads():
    cfg = load_config()
    assert {"data", "cache", "folds"} <= set(cfg)


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


# ---------------------------------------------------------------- typed keys (the project's base)
def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_null_default_has_a_declared_type():
    from pneumoseg.config import NULL_DEFAULT_TYPES, NULLABLE, base_defaults

    leaves = dict(_leaves(base_defaults()))
    assert {k for k, v in leaves.items() if v is None} == set(NULL_DEFAULT_TYPES)
    assert all(k in leaves and leaves[k] is not None for k in NULLABLE)


# (overrides, text the one-line error must contain): typed at load, naming key and expected type
TYPE_ERRORS = [
    (["model.freeze_bn=maybe"], "'model.freeze_bn' must be bool or null, got str 'maybe'"),
    (["model.freeze_bn=1"], "'model.freeze_bn' must be bool or null, got int 1"),
    (["model.depth=abc"], "'model.depth' must be int or null, got str 'abc'"),
    (["model.depth=2.5"], "'model.depth' must be int or null"),
    (["model.width=true"], "'model.width' must be int or null"),
    (["train.init_from=[1]"], "'train.init_from' must be str or null, got list [1]"),
    (["data.patient_map=3"], "'data.patient_map' must be str or null, got int 3"),
    (["model.decoder_channels=[a, 8, 8, 8, 8]"], "'model.decoder_channels' must be a list of ints"),
    (["model.decoder_channels=8"], "'model.decoder_channels' must be a list of ints"),
    (["tune.options=[1]"], "'tune.options' must be a mapping or null"),
    (["augment_neg=3"], "'augment_neg' must be a mapping or null"),
    (["predict.folds={a: 1}"], "'predict.folds' must be a fold number or a list of them"),
    (["tune.folds=[0.5]"], "'tune.folds' must be a fold number or a list of them"),
    (["train.stop_after_epoch=yes"], "'train.stop_after_epoch' must be int or null"),
    (["serve.queue=many"], "'serve.queue' must be int or null"),
    (["train.lr=null"], "'train.lr' must be float (default 0.0003), not null"),
    (["cache.size=null"], "'cache.size' must be int (default 512), not null"),
    (["train.amp=null"], "'train.amp' must be str (default 'auto'), not null"),
    (["train.epochs=abc"], "'train.epochs' must be int (default 20), got str 'abc'"),
    (["select.candidates=demo"], "'select.candidates' must be"),
    (["select.nested=maybe"], "'select.nested' must be bool"),
    (["select.max_steps=2.5"], "'select.max_steps' must be int"),
]


@pytest.mark.parametrize("overrides,message", TYPE_ERRORS, ids=lambda x: str(x)[:40])
def test_typed_values(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.freeze_bn=null"], ["model.arch=maskrcnn", "model.freeze_bn=false"],
        ["data.patient_map=null"], ["data.original_size=null"], ["data.sample_submission=null"],
        ["model.encoder_weights=null"], ["predict.tta=null"], ["predict.folds=full"],
        ["predict.folds=[0, full]"], ["tune.folds=1"], ["augment_neg={hflip: 0.0}"],
        ["model.decoder_channels=[8, 8, 8, 8, 8]"], ["train.lr=1"],  # int where a float is
    ],
    ids=str,
)  # fmt: skip
def test_null_and_declared_types_accepted(overrides):
    load_config(None, overrides)


def test_a_null_default_set_by_an_experiment_stays_nullable(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("model:\n  decoder_channels: [8, 8, 8, 8, 8]\n")
    assert load_config(exp, ["model.decoder_channels=null"])["model"]["decoder_channels"] is None


# ---------------------------------------------------------------- value rules (schema), directly
# (overrides, key the error names): each rule once; BOUNDS below holds the edge values accepted.
MC = ["model.arch=maskrcnn", "model.encoder=resnet18", "model.encoder_weights=null"]
UC = ["model.arch=unet_classic", "model.encoder=null", "model.encoder_weights=null"]
RULES = [
    (["exp=../x"], "exp"),
    (["data.layout=jpg"], "data.layout"),
    (["data.rle_format=rel"], "data.rle_format"),
    (["data.root="], "data.root"),
    (["data.original_size=15"], "data.original_size"),
    (["data.original_size=8193"], "data.original_size"),
    (["cache.dir="], "cache.dir"),
    (["cache.size=100"], "cache.size"),
    (["cache.size=0"], "cache.size"),
    (["cache.size=2080"], "cache.size"),
    (["cache.n_jobs=0"], "cache.n_jobs"),
    (["cache.n_jobs=-2"], "cache.n_jobs"),
    (["folds.n_folds=1"], "folds.n_folds"),
    (["folds.n_folds=21"], "folds.n_folds"),
    (["folds.file="], "folds.file"),
    (["folds.area_bins=[0]"], "folds.area_bins"),
    (["folds.area_bins=[0, 5, 5]"], "folds.area_bins"),
    (["folds.area_bins=[-1, 5]"], "folds.area_bins[0]"),
    (["model.arch=unetz"], "model.arch"),
    (["model.encoder=resnet35"], "model.encoder"),
    (["model.encoder=null"], "model.encoder"),
    (["model.encoder_weights=coco"], "model.encoder_weights"),
    (["model.in_channels=2"], "model.in_channels"),
    (["model.decoder_channels=[8, 8, 8, 8]"], "model.decoder_channels"),
    (["model.decoder_channels=[8, 8, 8, 8, 0]"], "model.decoder_channels"),
    (["model.aux_head=true", "model.aux_dropout=1"], "model.aux_dropout"),
    (["model.aux_head=true", "model.aux_dropout=-0.1"], "model.aux_dropout"),
    (["model.aux_dropout=0.5"], "model.aux_dropout"),  # without the aux head
    ([*MC, "model.min_score=1.5"], "model.min_score"),
    ([*MC, "model.trainable_layers=6"], "model.trainable_layers"),
    ([*MC, "model.fpn_channels=0"], "model.fpn_channels"),
    (["model.arch=doubleunet", "model.encoder=null", "model.depth=5"], "model.depth"),
    ([*UC, "model.depth=1"], "model.depth"),
    (["loss.bce=-1"], "loss.bce"),
    (["loss.bce=0", "loss.dice=0", "loss.focal=0"], "loss:"),
    (["loss.aux=1"], "loss.aux"),
    (["sampler.kind=balanced"], "sampler.kind"),
    (["sampler.pos_share=[]"], "sampler.pos_share"),
    (["sampler.pos_share=[0]"], "sampler.pos_share[0]"),
    (["sampler.pos_share=[0.5, 1.01]"], "sampler.pos_share[1]"),
    (["sampler.pos_weight=0"], "sampler.pos_weight"),
    (["augment.hflip=1.01"], "augment.hflip"),
    (["augment.rotate=181"], "augment.rotate"),
    (["augment.shift=-0.1"], "augment.shift"),
    (["augment_neg={flip: 1}"], "augment_neg.flip"),
    (["augment_neg={hflip: 2}"], "augment_neg.hflip"),
    (["train.epochs=0"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=1025"], "train.batch_size"),
    (["train.val_batch_size=1025"], "train.val_batch_size"),
    (["train.accum_steps=0"], "train.accum_steps"),
    (["train.top_k=0"], "train.top_k"),
    (["train.early_stop=-1"], "train.early_stop"),
    (["train.num_workers=-1"], "train.num_workers"),
    (["train.max_steps_per_epoch=-1"], "train.max_steps_per_epoch"),
    (["train.plateau_patience=-1"], "train.plateau_patience"),
    (["train.max_bad_steps=-1"], "train.max_bad_steps"),
    (["train.weight_decay=-1e-4"], "train.weight_decay"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs"),
    (["train.min_lr=-1"], "train.min_lr"),
    (["train.clip_grad=-1"], "train.clip_grad"),
    (["train.momentum=-1"], "train.momentum"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=.nan"], "train.lr"),
    (["train.lr=.inf"], "train.lr"),
    (["train.plateau_factor=1"], "train.plateau_factor"),
    (["train.plateau_factor=0"], "train.plateau_factor"),
    (["train.threshold=0"], "train.threshold"),
    (["train.threshold=1"], "train.threshold"),
    (["train.optimizer=sgdx"], "train.optimizer"),
    (["train.scheduler=step"], "train.scheduler"),
    (["train.select=iou"], "train.select"),
    ([*MC, "train.select=val_loss"], "train.select"),
    (["train.amp=fp8"], "train.amp"),
    (["train.stop_after_epoch=-1"], "train.stop_after_epoch"),
    (["train.init_from="], "train.init_from"),
    (["train.out_dir="], "train.out_dir"),
    (["train.device=tpu"], "train.device"),
    (["oof.size=7"], "oof.size"),
    (["oof.size=100000"], "oof.size"),
    (["oof.size=2049", "cache.size=2048"], "oof.size"),
    (["oof.size=2080", "data.original_size=4096"], "oof.size"),  # originals above the cap
    (["oof.size=1056"], "oof.size"),  # above max(cache.size 512, original 1024)
    (["oof.size=288", "cache.size=256", "data.original_size=256"], "oof.size"),
    (["oof.size=1056", "data.original_size=null"], "oof.size"),  # null: SIIM's 1024 assumed
    (["tune.thresholds=[1.5]"], "tune.thresholds[0]"),
    (["tune.min_areas=[-1]"], "tune.min_areas[0]"),
    (["tune.thresholds=[]", "tune.top_thresholds=[]"], "tune:"),
    (["tune.cls_thresholds=[0.5]"], "tune.cls_thresholds"),
    (["tune.folds=[5]"], "tune.folds"),
    (["tune.folds=[]"], "tune.folds"),
    (["tune.folds=[0, 0]"], "tune.folds"),
    (["tune.options={min_score: [0.3]}"], "tune.options.min_score"),  # unet has no such option
    ([*MC, "tune.options={min_score: []}"], "tune.options.min_score"),
    ([*MC, "tune.options={min_score: [1.5]}"], "tune.options.min_score[0]"),
    (["predict.experiments=[[a, 1, 2]]"], "predict.experiments[0]"),
    (["predict.experiments=[[a, 0]]"], "predict.experiments[0] weight"),
    (["predict.experiments=[[../a, 1]]"], "predict.experiments[0]"),
    (["predict.folds=[7]"], "predict.folds"),
    (["predict.folds=[half]"], "predict.folds"),
    (["predict.tta=[rotate]"], "predict.tta"),
    (["predict.tta=[8]"], "predict.tta"),
    (["predict.batch_size=0"], "predict.batch_size"),
    (["predict.batch_size=1025"], "predict.batch_size"),
    (["predict.amp=fp8"], "predict.amp"),
    (["predict.amp=fp16", "train.device=cpu"], "predict.amp"),
    (["predict.rle=rel"], "predict.rle"),
    (["predict.out_dir="], "predict.out_dir"),
    (["select.candidates=[a, a]"], "select.candidates: a listed twice"),
    (["select.candidates=[../a]"], "select.candidates[0]"),
    (["select.candidates=[a, 3]"], "select.candidates[1]"),
    (
        ["exp=mix", "select.candidates=[a, mix]"],
        "select.candidates: 'mix' is this config's own exp",
    ),
    (["select.max_steps=0"], "select.max_steps"),
    (["select.max_steps=1001"], "select.max_steps"),
]


@pytest.mark.parametrize("overrides,key", RULES, ids=lambda x: str(x)[:60])
def test_value_rules(overrides, key):
    from pneumoseg.schema import validate_config

    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value) and str(e.value).count("\n  - ") == 1, str(e.value)
    # validate_config alone says the same of the merged, unvalidated config
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_config(load_config(None, overrides, validate=False))


# the edge values the rules accept (each next to a RULES case one step beyond it)
BOUNDS = [
    ["data.original_size=16"], ["data.original_size=8192"],
    ["cache.size=32", "oof.size=8", "data.original_size=32"],
    ["cache.size=2048", "oof.size=2048"], ["cache.n_jobs=-1"], ["cache.n_jobs=1"],
    ["folds.n_folds=2"], ["folds.n_folds=20", "tune.folds=[19]"], ["folds.area_bins=[0, 1]"],
    ["model.decoder_channels=[1, 1, 1, 1, 1]"], ["model.aux_head=true", "model.aux_dropout=0"],
    ["model.aux_head=true", "model.aux_dropout=0.999"], ["model.in_channels=1"],
    [*MC, "model.min_score=0"], [*MC, "model.min_score=1"], [*MC, "model.trainable_layers=5"],
    [*MC, "model.trainable_layers=0"], ["model.arch=doubleunet", "model.encoder=null",
                                        "model.depth=4"],
    [*UC, "model.depth=6", "model.width=1"],
    ["loss.bce=0", "loss.dice=0", "loss.focal=0", "loss.lovasz=1"],
    ["sampler.pos_share=[1.0]"], ["sampler.pos_weight=0.001"],
    ["augment.hflip=1", "augment.rotate=180", "augment.shift=1", "augment.scale=0"],
    ["train.batch_size=1", "train.val_batch_size=1024"], ["train.batch_size=1024"],
    ["train.early_stop=0", "train.num_workers=0", "train.max_bad_steps=0", "train.clip_grad=0"],
    ["train.lr=1e-12"], ["train.threshold=0.001"], ["train.threshold=0.999"],
    ["train.plateau_factor=0.999"], ["train.stop_after_epoch=0"],
    ["oof.size=1024"], ["oof.size=1024", "cache.size=512", "data.original_size=null"],
    ["oof.size=256", "cache.size=128", "data.original_size=256"],
    ["tune.thresholds=[0, 1]", "tune.min_areas=[0]"], ["tune.thresholds=[]"],
    ["tune.folds=[4]"], [*MC, "tune.options={min_score: [0, 1]}"],
    ["predict.folds=[full, 4]"], ["predict.folds=-1"], ["predict.tta=[0.25, 4, vflip]"],
    ["predict.batch_size=1024"], ["predict.batch_size=1"], ["predict.amp=none", "train.device=cpu"],
    ["predict.experiments=[[a, 0.001], b]"],
    ["select.candidates=[a, b, c]", "select.max_steps=1"], ["select.max_steps=1000"],
    ["select.nested=false"],
]  # fmt: skip


@pytest.mark.parametrize("overrides", BOUNDS, ids=lambda x: " ".join(x)[:60])
def test_value_bounds_accepted(overrides):
    load_config(None, overrides)
