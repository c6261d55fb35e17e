"""Every example config under configs/examples/ passes `rlhf-dist check` (the config and every data file the
run reads), with the paths it names made real in tmp_path: the demo assets at runs/tiny (what
`rlhf-dist init-tiny runs/tiny` builds on a fresh clone) and, for the cluster examples, /mnt/shared (storage
every node mounts) holding the same demo data. One process, no Ray, no model loaded."""

from pathlib import Path

import pytest
import yaml

from rlhf_dist.cli.commands import main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml"))
SHARED = "/mnt/shared"


def test_there_are_examples():
    assert {"ppo.yaml", "dpo.yaml", "lora.yaml", "cluster.yaml"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_check(example, tiny, tmp_path, monkeypatch, capsys, drop_log_handlers):
    demo = Path(tiny["model"]).parent  # the session's tiny assets: model/ and data/
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(demo)
    shared = tmp_path / SHARED.lstrip("/")
    shared.mkdir(parents=True)
    (shared / "data").symlink_to(demo / "data")
    config = tmp_path / example.name
    config.write_text(example.read_text().replace(SHARED, str(shared)))
    for key in ("model_name", "tokenizer_path"):  # check opens them: the shared model is the tiny one here
        path = yaml.safe_load(config.read_text()).get(key)
        if path and path.startswith(str(shared)) and not Path(path).exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).symlink_to(Path(tiny["model"]))
    monkeypatch.chdir(tmp_path)
    code = main(["check", str(config)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "config and data ok" in out
