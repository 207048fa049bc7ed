"""Every `circuits-jax` subcommand: `--help` with an example, and bad arguments refused with one clear line.

The bad-argument table runs with the model loaders replaced by a function that fails the test, so
each case also proves that the argument is checked before any model (or the trained induction
model) loads. Nothing here touches SmolLM2.
"""

import subprocess
import sys

import pytest

from circuits_jax.app.cli import EXPERIMENTS, build_parser, main


def _subcommands() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return list(sub.choices)


def _run(argv, capsys) -> tuple[int, str]:
    """Exit status (argparse's SystemExit or main's return) and stderr."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def test_every_subcommand_is_listed_in_the_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert len(_subcommands()) >= 14 and "examples:" in text
    for name in _subcommands():
        assert name in text


@pytest.mark.parametrize("name", _subcommands())
def test_help_has_an_example_that_names_the_subcommand(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text.lower(), f"`circuits-jax {name} --help` shows no example"
    # the example is a real command line of this subcommand
    assert f"circuits-jax {name}" in text.split("example", 1)[1]


M = "/nonexistent/model-dir"
# outputs: a folder that does not exist under the working directory, so the --out check (which creates nothing)
# passes for any user and the argument named in each case below is what is refused
O = "cj-not-created"
PAIR = ["--model", M, "--clean", "a b", "--corrupt", "a c", "--answer", " b", "--wrong", " c", "--out", f"{O}/x.npz"]
STEER = ["steer", "--model", M, "--positive", "Love", "--negative", "Hate", "--prompt", "I think"]
TRACE = ["trace-fact", "--model", M, "--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower", "--out", f"{O}/t"]
SAE = ["train-sae", "--model", M, "--out", f"{O}/s"]
GRAPH = ["graph", "--model", M, "--prompt", "The capital of France is", "--out", f"{O}/g"]
DISC = ["discover", "--task", "ioi", "--model", M, "--out", f"{O}/d"]

# (argv, text the one-line error must contain: the flag, or the bad value where argparse names a positional)
BAD = {
    "predict top-k 0": (["predict", "--model", M, "--prompt", "hi", "--top-k", "0"], "--top-k"),
    "predict top-k text": (["predict", "--model", M, "--prompt", "hi", "--top-k", "ten"], "--top-k"),
    "predict no prompt": (["predict", "--model", M], "--prompt"),
    "patch unknown site": (["patch", *PAIR, "--site", "resid_pree"], "--site"),
    "patch axes": (["patch", *PAIR, "--site", "resid_pre", "--by", "layer,neuron"], "--by"),
    "patch axes order": (["patch", *PAIR, "--site", "z", "--by", "head,layer"], "--by"),
    "patch layers text": (["patch", *PAIR, "--layers", "a,b"], "--layers"),
    "patch layers negative": (["patch", *PAIR, "--layers", "-1"], "--layers"),
    "patch layers reversed": (["patch", *PAIR, "--layers", "5-2"], "--layers"),
    "patch chunk 0": (["patch", *PAIR, "--chunk-size", "0"], "--chunk-size"),
    "patch memory negative": (["patch", *PAIR, "--memory-gb", "-1"], "--memory-gb"),
    "patch mesh": (["patch", *PAIR, "--mesh", "foo=2"], "--mesh"),
    "patch missing answer": (["patch", "--clean", "a", "--corrupt", "b", "--wrong", " c", "--out", "x.npz"], "--answer"),
    "attribute method": (["attribute", "--method", "shap", *PAIR], "--method"),
    "attribute steps 0": (["attribute", "--method", "eap-ig", *PAIR, "--steps", "0"], "--steps"),
    "path-patch no receivers": (["path-patch", *PAIR], "--receivers"),
    "discover task": (["discover", "--task", "ioii", "--model", M, "--out", f"{O}/d"], "ioii"),
    "discover fraction": ([*DISC, "--fraction", "2"], "--fraction"),
    "discover n 0": ([*DISC, "--n", "0"], "--n"),
    "discover steps": ([*DISC, "--steps", "-3"], "--steps"),
    "discover level": ([*DISC, "--method", "eap", "--level", "node"], "--level"),
    "discover ablation": ([*DISC, "--method", "eap-ig", "--ablation", "zero"], "--ablation"),
    "ioi n 1": (["ioi", "--model", M, "--n", "1"], "--n"),
    "ioi fraction": (["ioi", "--model", M, "--fraction", "1.5"], "--fraction"),
    "ioi template": (["ioi", "--model", M, "--template", "7"], "--template"),
    "ioi steps": (["ioi", "--model", M, "--steps", "0"], "--steps"),
    "experiment name": (["experiment", "inductoin"], "inductoin"),
    "train-sae nothing to train": (SAE, "--site"),
    "train-sae clt text": ([*SAE, "--clt-layers", "3-a"], "--clt-layers"),
    "train-sae clt reversed": ([*SAE, "--clt-layers", "3-1"], "--clt-layers"),
    "train-sae width 0": ([*SAE, "--site", "blocks.0.hook_resid_post", "--width", "0"], "--width"),
    "train-sae tokens negative": ([*SAE, "--site", "blocks.0.hook_resid_post", "--tokens", "-5"], "--tokens"),
    "train-sae site kind": ([*SAE, "--site", "blocks.0.hook_resid_postt"], "--site"),
    "train-sae site form": ([*SAE, "--site", "resid_post"], "--site"),
    "train-sae transcoder negative": ([*SAE, "--transcoder", "-1"], "--transcoder"),
    "train-sae arch": ([*SAE, "--transcoder", "1", "--arch", "gate"], "--arch"),
    "train-sae lr": ([*SAE, "--transcoder", "1", "--lr", "0"], "--lr"),
    "train-sae k list": ([*SAE, "--site", "blocks.0.hook_resid_post", "--k", "16,,32"], "--k"),
    "train-sae sites with target": ([*SAE, "--site", "blocks.0.hook_resid_post,blocks.1.hook_resid_post", "--target",
                                     "blocks.1.hook_mlp_out"], "--site"),
    "train-sae lists with clt": ([*SAE, "--clt-layers", "0-1", "--k", "4,8"], "--clt-layers"),
    "features missing dir": (["features", "/nonexistent/sae", "--html"], "/nonexistent/sae"),
    "features n 0": (["features", "/nonexistent/sae", "--html", "--n", "0"], "--n"),
    "graph missing transcoders": ([*GRAPH, "--transcoders", "/nonexistent/tc"], "--transcoders"),
    "graph node threshold": ([*GRAPH, "--transcoders", "/nonexistent/tc", "--node-threshold", "2"], "--node-threshold"),
    "graph batch 0": ([*GRAPH, "--transcoders", "/nonexistent/tc", "--batch-size", "0"], "--batch-size"),
    "graph examples negative": ([*GRAPH, "--transcoders", "/nonexistent/tc", "--examples", "-1"], "--examples"),
    "steer coeffs": ([*STEER, "--layer", "3", "--coeffs", "x,y"], "--coeffs"),
    "steer layer negative": ([*STEER, "--layer", "-1", "--coeffs", "1"], "--layer"),
    "steer layer text": ([*STEER, "--layer", "six", "--coeffs", "1"], "--layer"),
    "steer max-new-tokens": ([*STEER, "--layer", "3", "--coeffs", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
    "steer align": ([*STEER, "--layer", "3", "--coeffs", "1", "--align", "truncate"], "--align"),
    "trace-fact kinds": ([*TRACE, "--kinds", "resid,neurons"], "--kinds"),
    "trace-fact samples": ([*TRACE, "--samples", "0"], "--samples"),
    "trace-fact window": ([*TRACE, "--window", "-1"], "--window"),
    "trace-fact noise": ([*TRACE, "--noise", "-1"], "--noise"),
    "scrub prev head range": (["scrub", "--prev-heads", "9"], "--prev-heads"),
    "scrub induction heads text": (["scrub", "--induction-heads", "a"], "--induction-heads"),
    "scrub trees": (["scrub", "--trees", "1"], "--trees"),
    "scrub wrong-prev": (["scrub", "--wrong-prev", "-2"], "--wrong-prev"),
    "das layers": (["das", "--model", M, "--layers", "a-b"], "--layers"),
    "das kind": (["das", "--model", M, "--kind", "hook_resid_preX"], "--kind"),
    "das n-train": (["das", "--model", M, "--pairs", "10", "--n-train", "20"], "--n-train"),
    "das k": (["das", "--model", M, "--k", "0"], "--k"),
    "das method": (["das", "--model", M, "--method", "pca"], "--method"),
    "das layer-step": (["das", "--model", M, "--layer-step", "0"], "--layer-step"),
}


def test_the_table_covers_every_subcommand_that_takes_options():
    covered = {argv[0] for argv, _ in BAD.values()}
    assert set(_subcommands()) <= covered, f"no bad-argument case for {set(_subcommands()) - covered}"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_exits_nonzero_with_one_line_naming_it(case, no_model, capsys):
    argv, needle = BAD[case]
    rc, err = _run(argv, capsys)
    assert rc not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("circuits-jax") and ": error: " in last, err
    assert needle in last, f"{last!r} does not name {needle!r}"


def test_missing_model_path_is_named_and_nonzero(capsys):
    rc, err = _run(["predict", "--model", M, "--prompt", "hi"], capsys)
    assert rc == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("circuits-jax: error: ") and M in line


def test_console_process_exit_status_and_stderr():
    """The installed entry point, as a shell sees it: status 2 and a one-line error, no traceback."""
    cmd = [sys.executable, "-c", "import sys; from circuits_jax.app.cli import main; sys.exit(main())",
           "steer", "--model", M, "--positive", "a", "--negative", "b", "--layer", "1", "--prompt", "p", "--coeffs", "1,x"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "circuits-jax: error: --coeffs needs comma-separated numbers, got '1,x'"


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_has_help_with_an_example_and_refuses_unknown_options(name, capsys):
    """`circuits-jax experiment NAME --help` reaches the script's own parser (nothing runs)."""
    with pytest.raises(SystemExit) as e:
        main(["experiment", name, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out.lower(), f"`circuits-jax experiment {name} --help` shows no example"
    with pytest.raises(SystemExit) as e:
        main(["experiment", name, "--no-such-option"])
    assert e.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err.strip().splitlines()[-1]


def test_site_options_read_cores_site_table():
    """One site vocabulary: `--site` choices, `--kind` and train-sae's site names all come from core's table."""
    from circuits_jax.app.options import check_site_name, site_kind
    from circuits_jax.core import LAYER_KINDS, PATCH_SITES, SITE_KINDS

    sub = build_parser()._subparsers._group_actions[0].choices
    for name in ("patch", "attribute"):
        (site,) = [a for a in sub[name]._actions if a.dest == "site"]
        assert list(site.choices) == list(PATCH_SITES)
    for k in SITE_KINDS:  # every row of the table, per-layer at any layer, global as is
        check_site_name(f"blocks.123.{k.kind}" if k.per_layer else k.kind, "--site")
    assert [site_kind(k) for k in LAYER_KINDS] == list(LAYER_KINDS)
    with pytest.raises(ValueError, match=r"^--target: unknown activation site 'blocks.7.hook_mlp_outt'; closest valid names: "
                                         r"blocks.7.hook_mlp_out"):  # fmt: skip
        check_site_name("blocks.7.hook_mlp_outt", "--target")


def test_every_command_that_loads_a_model_takes_dtype(capsys):
    """`--dtype` (float32, bfloat16, float16) wherever `--model` is; an unknown one is refused by argparse."""
    from circuits_jax.core import DTYPES

    (sub,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    with_model = [name for name, p in sub.choices.items() if any("--model" in a.option_strings for a in p._actions)]
    assert len(with_model) >= 12, with_model
    for name in with_model:
        (dt,) = [a for a in sub.choices[name]._actions if "--dtype" in a.option_strings]
        assert tuple(dt.choices) == DTYPES, name
    rc, err = _run(["predict", "--model", M, "--prompt", "x", "--dtype", "int8"], capsys)
    assert rc == 2 and "invalid choice: 'int8'" in err
