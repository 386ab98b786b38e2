import json
import subprocess
import sys

import pytest

from bdjax.cli import main


def _bdjax(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bdjax", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    r = _bdjax("attack", "--dataset", "synthetic", "--model", "small_cnn", "--attack",
               "badnets", "--ratio", "0.1", "--target", "0", "--seed", "0", "--out", str(out),
               "--smoke", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "clean ACC" in r.stdout
    return out


def test_attack_writes_checkpoint_with_metadata(smoke_ckpt):
    meta = json.loads((smoke_ckpt / "bdjax.json").read_text())
    assert meta["attack"]["name"] == "badnets" and meta["poison_ratio"] == 0.1
    assert meta["n_poisoned"] == 200 and meta["dataset"]["name"] == "synthetic"
    for k in ("acc", "asr", "ra", "seed", "versions"):
        assert k in meta


def test_info_prints_metadata(smoke_ckpt, capsys):
    assert main(["info", str(smoke_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "small_cnn" in out and "badnets" in out and "ASR" in out


@pytest.mark.parametrize("setting", [["--spc", "2"], ["--ratio", "0.05"]])
def test_defend_appends_rows(smoke_ckpt, tmp_path, setting, capsys):
    out = tmp_path / "r.jsonl"
    code = main(["defend", "--checkpoint", str(smoke_ckpt), "--defense", "ft", *setting,
                 "--trials", "2", "--seed", "0", "--out", str(out), "--set", "epochs=2",
                 "--smoke"])
    assert code == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1]
    assert rows[0]["settings"]["epochs"] == 2
    assert "ACC before" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["attack", "--attack", "nope", "--out", "X"], "unknown attack 'nope'"),
    (["attack", "--ratio", "1.5", "--out", "X"], "poison ratio 1.5"),
    (["attack", "--target", "12", "--out", "X"], "target 12"),
    (["attack", "--model", "resnet", "--out", "X"], "unknown model 'resnet'"),
    (["attack", "--dataset", "imagenet", "--out", "X"], "unknown dataset 'imagenet'"),
    (["defend", "--checkpoint", "/nonexistent", "--defense", "ft", "--spc", "10",
      "--out", "r.jsonl"], "/nonexistent"),
    (["info", "/nonexistent"], "/nonexistent"),
])
def test_bad_input_exits_2_with_one_sentence(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("argv", [["--attack", "nope"], ["--target", "12"], ["--model", "x"],
                                  ["--param", "size=3", "--attack", "blended"], ["--out", "."]])
def test_attack_rejects_bad_input_before_loading_the_data(argv, monkeypatch, tmp_path, capsys):
    from bdjax import data

    def loaded(*args, **kwargs):
        raise AssertionError("the data was loaded before the input was checked")

    monkeypatch.setattr(data, "load", loaded)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-checkpoint").touch()  # "." is a directory that is not a checkpoint
    assert main(["attack", "--out", "X", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_defend_rejects_unknown_defense_and_bad_spc(smoke_ckpt, tmp_path, capsys):
    assert main(["defend", "--checkpoint", str(smoke_ckpt), "--defense", "magic", "--spc",
                 "10", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "unknown defense 'magic'" in capsys.readouterr().err
    assert main(["defend", "--checkpoint", str(smoke_ckpt), "--defense", "ft", "--spc",
                 "0", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "spc 0" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_demo_smoke_runs_end_to_end(tmp_path):
    r = _bdjax("demo", "--smoke", "--out-dir", str(tmp_path / "demo"), "--trials", "2",
               "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "ft spc=10" in r.stdout and "demo finished" in r.stdout
    rows = (tmp_path / "demo" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2


def test_bdjax_runs_without_tensorflow_datasets(tmp_path):
    """With tfds made unimportable, the package, the CLI and the synthetic path still work."""
    code = (
        "import sys; sys.modules['tensorflow_datasets'] = None\n"
        "import bdjax.cli, bdjax.data, bdjax.experiment, bdjax.checkpoint\n"
        "from bdjax import data\n"
        "ds = data.load('synthetic', n_train=200, n_test=50)\n"
        "assert ds.x_train.shape == (200, 32, 32, 3)\n"
        "try:\n"
        "    data.load('cifar10', data_dir=sys.argv[1])\n"
        "except Exception as e:\n"
        "    assert type(e).__name__ == 'BdjaxError' and 'bdjax[tfds]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('cifar10 loaded without tfds')\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _attack_args(*argv):
    from bdjax.cli import _parser

    return _parser().parse_args(["attack", "--out", "X", *argv])


def test_the_dataset_config_chooses_the_model_and_training():
    """`bdjax attack --dataset cifar10` trains PreAct-ResNet18 for 100 epochs as
    BackdoorBench does; the synthetic default is the small CNN's CPU settings."""
    from bdjax.cli import attack_settings

    dataset, model, _, train = attack_settings(_attack_args("--dataset", "cifar10"))
    assert (dataset, model, train["epochs"]) == ("cifar10", "preact_resnet18", 100)
    dataset, model, _, train = attack_settings(_attack_args())
    assert (dataset, model, train["epochs"]) == ("synthetic", "small_cnn", 20)
    # WaNet's warp needs 60 epochs on the small CNN, BPP and LF the reference's 100
    # (configs/synthetic.py), the others 20
    for attack, epochs in (("wanet", 60), ("bpp", 100), ("lf", 100), ("badnets", 20)):
        assert attack_settings(_attack_args("--attack", attack))[3]["epochs"] == epochs
    _, model, _, train = attack_settings(_attack_args("--dataset", "cifar10", "--model",
                                                      "vgg19_bn", "--epochs", "3"))
    assert (model, train["epochs"]) == ("vgg19_bn", 3)
    dataset, model, cfg, _ = attack_settings(_attack_args("--config", "survey_cifar10"))
    assert (dataset, model) == ("cifar10", "preact_resnet18")
    assert cfg["defenses"]["fst"] == {"epochs": 15, "lr": 0.01, "alpha": 0.2}
    assert cfg["sweep"]["spc"] == [2, 10, 100] and cfg["sweep"]["trials"] == 10


def test_attack_train_changes_one_attacks_training(tmp_path):
    """A config's ``attack_train`` changes the training of the attacks it names only (in
    `bdjax attack` and in a sweep's attack cells); flags still win; an unknown attack
    name is one sentence."""
    import json

    from bdjax import config, grid
    from bdjax.cli import attack_settings
    from bdjax.errors import BdjaxError

    own = tmp_path / "mine.py"
    own.write_text(
        "def get_config(smoke=False):\n"
        "    return {'dataset': 'synthetic', 'model': 'small_cnn',\n"
        "            'train': {'epochs': 4, 'lr': 0.05},\n"
        "            'attack_train': {'wanet': {'epochs': 9}},\n"
        "            'sweep': {'attacks': ['badnets', 'wanet'], 'defenses': ['ft'],\n"
        "                      'spc': [10], 'trials': 1}}\n")
    train = lambda *a: attack_settings(_attack_args("--config", str(own), *a))[3]  # noqa: E731
    assert train("--attack", "wanet") == {"epochs": 9, "lr": 0.05}
    assert train("--attack", "badnets") == {"epochs": 4, "lr": 0.05}
    assert train("--attack", "wanet", "--epochs", "2")["epochs"] == 2
    cells = grid.expand(config.load(str(own))).attack_cells
    assert {c.attack: json.loads(c.train)["epochs"] for c in cells} == {"badnets": 4,
                                                                         "wanet": 9}
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(smoke=False):\n"
                   "    return {'attack_train': {'wannet': {'epochs': 9}}}\n")
    with pytest.raises(BdjaxError, match="unknown attack 'wannet'; accepted: .*wanet"):
        attack_settings(_attack_args("--config", str(bad)))


def test_shipped_configs_all_load(tmp_path):
    from bdjax import config

    assert {"cifar10", "survey_cifar10", "synthetic"} <= set(config.names())
    for name in config.names():
        for smoke in (False, True):
            cfg = config.load(name, smoke=smoke)
            assert cfg["dataset"] and cfg["model"], name
    own = tmp_path / "mine.py"
    own.write_text("def get_config(smoke=False):\n    return {'defenses': {'ft': {'epochs': 3}}}\n")
    assert config.load(str(own))["defenses"] == {"ft": {"epochs": 3}}


@pytest.mark.parametrize("argv,match", [
    (["attack", "--config", "nope", "--out", "X"], "unknown config 'nope'"),
    (["attack", "--config", "missing.py", "--out", "X"], "config 'missing.py' does not exist"),
])
def test_bad_config_names_exit_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err
