"""The pretrain and finetune flags are generated from the config dataclasses (ferrolm.config), a --config
TOML file gives the same fields, flags override it, and the resolved config is saved in the run."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrolm.archs import PRESETS
from ferrolm.cli import build_parser, main
from ferrolm.config import (
    PARALLEL_MODES,
    FinetuneConfig,
    TrainConfig,
    dump_toml,
    parse_count,
)

CONFIGS = {"pretrain": TrainConfig, "finetune": FinetuneConfig}


def command_parser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def flag_of(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    found = [
        a for a in parser._actions if a.dest == dest and f"--{dest.replace('_', '-')}" in a.option_strings
    ]
    assert len(found) == 1, f"{parser.prog}: no --{dest.replace('_', '-')} flag for the field {dest}"
    return found[0]


def default_of(field: dataclasses.Field[Any]) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_config_field_is_a_flag_that_help_lists(command: str) -> None:
    """Derived from the dataclass: a field added tomorrow is a flag without another line."""
    parser = command_parser(command)
    text = parser.format_help()
    for field in dataclasses.fields(CONFIGS[command]):
        action = flag_of(parser, field.name)
        assert action.default is None  # "not given": a --config file's or a resumed run's value stays
        assert f"--{field.name.replace('_', '-')}" in text
        assert field.metadata["help"].split()[0] in text  # the field's own help text


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_shows_each_fields_default_and_choices(command: str) -> None:
    parser = command_parser(command)
    for field in dataclasses.fields(CONFIGS[command]):
        action = flag_of(parser, field.name)
        meta = field.metadata
        if meta["required"]:
            assert "(required" in action.help
            continue
        shown = meta["default_text"]
        if shown is None:
            default = default_of(field)
            if isinstance(default, bool):
                shown = "true" if default else "false"
            else:
                shown = "none" if default is None else str(default)
        assert action.help.endswith(f"(default: {shown})"), (field.name, action.help)
    if command == "pretrain":
        preset = flag_of(parser, "preset")
        assert preset.choices == tuple(PRESETS)  # the table's own keys, not a hand-written list
        assert flag_of(parser, "parallel").choices == PARALLEL_MODES
        assert flag_of(parser, "packing").choices == ("concat", "best_fit")


class Captured(Exception):
    pass


@pytest.fixture
def captured(monkeypatch) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Run `ferrolm pretrain/finetune ...` up to the config it resolves (the training is not run)."""
    import ferrolm.finetune
    import ferrolm.train

    seen: dict[str, Any] = {}

    def capture(config: Any, **kwargs: Any) -> dict[str, Any]:
        seen["config"], seen["kwargs"] = config, kwargs
        raise Captured

    monkeypatch.setattr(ferrolm.train, "pretrain", capture)
    monkeypatch.setattr(ferrolm.finetune, "finetune", capture)
    return seen


def resolve(captured: dict[str, Any], *argv: str) -> Any:
    with pytest.raises(Captured):
        main(list(argv))
    return captured["config"]


def test_no_flags_means_the_dataclass_defaults(captured) -> None:  # type: ignore[no-untyped-def]
    assert resolve(captured, "pretrain", "--data", "d", "--out", "o") == TrainConfig(data="d", out="o")
    args = ("--model", "m", "--train", "t", "--eval", "e", "--out", "o")
    assert resolve(captured, "finetune", *args) == FinetuneConfig(model="m", train="t", eval="e", out="o")


def test_flags_are_typed_from_the_annotations(captured) -> None:  # type: ignore[no-untyped-def]
    config = resolve(
        captured,
        "pretrain",
        "--data=d",
        "--out=o",
        "--lr=3e-4",
        "--batch-size=4",
        "--max-tokens=10e9",
        "--compile",
        "--no-progress",
        "--objective=mlm",
        "--preset=tiny-roberta",
        "--model",
        "n_layer=3",
        "--model",
        "arch=llama",
        "--dropout=0.2",
        "--init-from=hf/x",
    )
    assert (config.lr, config.batch_size, config.max_tokens) == (3e-4, 4, 10_000_000_000)
    assert config.compile is True and config.progress is False and config.objective == "mlm"
    assert config.model == {"n_layer": 3, "arch": "llama", "dropout": 0.2}
    assert config.init_from == "hf/x" and config.preset == "tiny-roberta"
    assert resolve(captured, "pretrain", "--data=d", "--out=o", "--quiet").progress is False


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch-size=1.5", "argument --batch-size: expected an integer, got '1.5'"),
        ("--lr=fast", "argument --lr: expected a number, got 'fast'"),
        ("--max-tokens=1.5e0", "argument --max-tokens: expected a whole number"),
        ("--packing=zigzag", "argument --packing: invalid choice: 'zigzag'"),
        ("--preset=huge", "argument --preset: invalid choice: 'huge'"),
        ("--model=n_layer", "argument --model: expected KEY=VALUE, got 'n_layer'"),
    ],
)
def test_a_bad_flag_is_a_usage_error_naming_it(flag: str, message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data=d", "--out=o", flag])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_required_option_names_the_flags(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", "m", "--train", "t"])
    assert exit_info.value.code == 2
    assert "required: --eval, --out (a flag or a key of --config)" in capsys.readouterr().err


def test_toml_gives_the_fields_and_flags_override_it(captured, tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "run.toml"
    toml.write_text(
        'data = "shards"\nout = "runs/a"\nlr = 1e-3\nbatch_size = 4\ncompile = true\n'
        "[model]\nn_layer = 3\nn_head = 2\n"
    )
    config = resolve(
        captured, "pretrain", "--config", str(toml), "--lr", "2e-3", "--no-compile", "--model", "n_head=4"
    )
    assert (config.data, config.out, config.batch_size) == ("shards", "runs/a", 4)  # from the file
    assert (config.lr, config.compile) == (2e-3, False)  # the flags win, --no-compile too
    assert config.model == {"n_layer": 3, "n_head": 4}  # the table merged key by key
    finetune_toml = tmp_path / "ft.toml"
    finetune_toml.write_text('model = "m"\ntrain = "t"\neval = "e"\nout = "o"\nepochs = 5\n')
    config = resolve(captured, "finetune", "--config", str(finetune_toml), "--epochs", "2")
    assert (config.model, config.epochs) == ("m", 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lrr = 1e-3\n", r"run.toml: unknown keys ['lrr']"),
        ('lr = "fast"\n', "run.toml: lr must be a finite number > 0, got 'fast'"),
        ("batch_size = 1.5\n", "run.toml: batch_size must be a positive integer, got 1.5"),
        ('compile = "yes"\n', "run.toml: compile must be true or false, got 'yes'"),
        ('packing = "zigzag"\n', "run.toml: packing must be concat or best_fit, got 'zigzag'"),
        ("preset = 3\n", "run.toml: preset must be a string, got 3"),
        ("model = 3\n", "run.toml: model must be a table (a dict), got 3"),
        ("data = 7\n", "run.toml: data must be a string, got 7"),
        ("lr = \n", "run.toml: not valid TOML"),
        ("[model\n", "run.toml: not valid TOML"),
    ],
)
def test_a_bad_toml_file_is_refused_naming_the_file_and_key(text, message, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    # The flags are good: the error is the file's (not blamed on a flag, and before any training).
    assert main(["pretrain", "--config", str(toml), "--data", "d", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ferrolm: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_shard_merge_is_an_argparse_subcommand() -> None:
    from ferrolm.cli import _cmd_shard, _cmd_shard_merge

    parser = build_parser()
    args = parser.parse_args(["shard", "merge", "p0", "p1", "--out", "all"])
    assert (args.func, args.parts, args.out) == (_cmd_shard_merge, ["p0", "p1"], "all")
    for argv in (
        ["shard", "corpus/", "--tokenizer", "t.json", "--out", "s"],
        ["shard", "--tokenizer", "t.json", "--out", "s", "corpus/"],  # options first, as before
    ):
        args = parser.parse_args(argv)
        assert (args.func, args.inputs, args.tokenizer) == (_cmd_shard, ["corpus/"], "t.json")


def test_shard_help_is_the_shard_commands(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv, shown in ((["shard", "--help"], "--tokenizer"), (["shard", "merge", "--help"], "parts")):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert out.startswith(f"usage: ferrolm {' '.join(argv[:-1])} ") and shown in out


@given(n=st.integers(min_value=0, max_value=10**30), exponent=st.integers(min_value=0, max_value=12))
def test_parse_count_reads_integers_and_scientific_notation(n: int, exponent: int) -> None:
    assert parse_count(str(n)) == n
    small = n % 1000
    assert parse_count(f"{small}e{exponent}") == small * 10**exponent


@pytest.mark.parametrize("text", ["1.5", "1e-3", "inf", "nan", "ten", ""])
def test_parse_count_refuses_what_is_not_a_whole_number(text: str) -> None:
    with pytest.raises(ValueError, match="expected a whole number"):
        parse_count(text)


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
numbers = st.floats(min_value=1e-9, max_value=1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(
    data=names,
    lr=numbers,
    max_steps=st.none() | st.integers(1, 10**12),
    compile_=st.booleans(),
    packing=st.sampled_from(["concat", "best_fit"]),
    preset=st.sampled_from(sorted(PRESETS)),
    model=st.dictionaries(
        st.sampled_from(["n_layer", "n_head", "arch", "dropout"]),
        st.integers(1, 64) | names | st.floats(0, 0.9),
    ),
)
def test_dump_toml_reads_back_to_the_same_config(
    data, lr, max_steps, compile_, packing, preset, model
) -> None:  # type: ignore[no-untyped-def]
    import tomllib

    config = TrainConfig(
        data=data,
        out="o",
        lr=lr,
        max_steps=max_steps,
        compile=compile_,
        packing=packing,
        preset=preset,
        model=model,
    )
    assert TrainConfig.from_dict(tomllib.loads(dump_toml(config)), source="dump") == config
