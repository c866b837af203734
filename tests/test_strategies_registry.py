"""The registry: strategies register where they are defined, build with their
defaults, bad values name the parameter, and what the coordinator asks about a
strategy (linear, needs every update, ranks) is read from its class."""

from __future__ import annotations

import ast
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import strategies
from strategies import STRATEGIES, AggregationError, Strategy, build_strategy, register_strategy
from strategies.base import FAMILIES
from strategies.registry import heterogeneous_rank_strategies, linear_strategies

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(strategies.__file__).parent

BAD = [
    ("fedprox", "mu", -0.01), ("fedprox", "mu", float("nan")), ("fedprox", "mu", "0.1"),
    ("fedavgm", "server_learning_rate", 0.0), ("fedavgm", "server_momentum", 1.0),
    ("fedavgm", "server_momentum", -0.1),
    ("fedadam", "eta", 0.0), ("fedadam", "beta_1", 1.0), ("fedadam", "beta_2", -0.5), ("fedadam", "tau", 0.0),
    ("fedyogi", "eta", -1.0), ("fedyogi", "beta_2", 1.5), ("fedyogi", "tau", float("inf")),
    ("fedadagrad", "eta", 0.0), ("fedadagrad", "tau", -1e-3),
    ("median", "max_updates", 0), ("trimmed-mean", "beta", 0.5), ("trimmed-mean", "beta", -0.1),
    ("trimmed-mean", "max_updates", 2.5),
    ("krum", "num_malicious", -1), ("krum", "num_to_select", 0), ("krum", "num_malicious", True),
    ("norm-bounded", "clip_norm", 0.0), ("norm-bounded", "clip_norm", -1.0),
    ("exact-lora", "residual", "yes"), ("exact-lora", "max_updates", -3), ("flexlora", "max_updates", 0),
    ("dp-fedavg", "clip_norm", 0.0), ("dp-fedavg", "noise_multiplier", -1.0),
    ("dp-fedavg", "noise_placement", "client"), ("dp-fedavg", "noise_seed", -2),
]

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def small_adapter(value: float) -> dict[str, np.ndarray]:
    return {A: np.full((2, 3), value, np.float32), B: np.full((4, 2), value, np.float32)}


def own_secure_input(cls: type[Strategy]) -> bool:
    return cls.secure_input is not Strategy.secure_input


# ---- what is registered -------------------------------------------------------

def test_every_registered_class_is_a_concrete_strategy_named_by_its_key() -> None:
    names = STRATEGIES.names()
    assert len(names) == len(set(names)) >= 1
    for name, cls in STRATEGIES.items():
        assert inspect.isclass(cls) and issubclass(cls, Strategy) and not inspect.isabstract(cls), name
        assert cls.name == name == name.lower(), name
        assert vars(cls)["name"] == name, f"{name}: the name must be the class's own, not inherited"
        assert cls.__module__.startswith("strategies."), name
        assert STRATEGIES.get(name.upper()) is cls and name in STRATEGIES


def _strategy_classes_defined_in(module_name: str) -> list[type[Strategy]]:
    module = sys.modules[module_name]
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and issubclass(obj, Strategy) and obj.__module__ == module_name]


def test_every_module_registers_the_concrete_strategies_it_defines() -> None:
    registered = {cls for _, cls in STRATEGIES.items()}
    modules = [m.name for m in pkgutil.iter_modules([str(PACKAGE_DIR)]) if not m.name.startswith("_")]
    seen = 0
    for module_name in modules:
        for cls in _strategy_classes_defined_in(f"strategies.{module_name}"):
            if inspect.isabstract(cls):
                continue
            seen += 1
            # a concrete class left unregistered is only acceptable as the base of registered ones
            is_base = any(issubclass(other, cls) and other is not cls for other in registered)
            assert cls in registered or is_base, f"strategies/{module_name}.py defines {cls.__name__} unregistered"
    assert seen >= len(registered)


def test_modules_write_each_name_once() -> None:
    # the decorator sets ``name``: a registered class never assigns it itself
    for name, cls in STRATEGIES.items():
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
        assert isinstance(node, ast.ClassDef)
        for stmt in node.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            assert not any(isinstance(t, ast.Name) and t.id == "name" for t in targets), \
                f"{name}: {cls.__name__} sets name; @register_strategy does"


def test_names_are_listed_by_family_then_alphabetically() -> None:
    names = STRATEGIES.names()
    keys = [(FAMILIES.index(STRATEGIES.get(n).family) if STRATEGIES.get(n).family in FAMILIES else len(FAMILIES),
             STRATEGIES.get(n).family, n) for n in names]
    assert keys == sorted(keys)
    assert [n for n, _ in STRATEGIES.items()] == names
    assert {STRATEGIES.get(n).family for n in names} <= set(FAMILIES), "every built-in strategy has a known family"


# ---- building -------------------------------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES.names())
def test_builds_with_defaults_and_documents_its_parameters(name: str) -> None:
    strategy = build_strategy(name)
    assert isinstance(strategy, Strategy) and strategy.name == name
    doc = inspect.getdoc(type(strategy)) or ""
    assert "Parameters" in doc
    for param in inspect.signature(type(strategy).__init__).parameters:
        if param != "self":
            assert param in doc, f"{name}: parameter {param} is not documented"
    assert strategy.configure_train(1) == ({"proximal-mu": 0.01} if name == "fedprox" else {})
    assert strategy.max_updates == (256 if strategy.needs_every_update else None)


@pytest.mark.parametrize("name,param,value", BAD)
def test_bad_values_name_the_parameter(name: str, param: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{param}'"):
        build_strategy(name, {param: value})


def test_accepted_values() -> None:
    assert build_strategy("krum", {"num_malicious": 2, "num_to_select": 3.0}).num_to_select == 3
    assert build_strategy("fedadam", {"eta": 1}).eta == 1.0
    assert build_strategy("trimmed-mean", {"beta": 0}).beta == 0.0
    assert build_strategy("median", {"max_updates": np.int64(8)}).max_updates == 8
    assert build_strategy("exact-lora", {"residual": True}).residual is True


def test_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedmagic'") as err:
        build_strategy("fedmagic")
    assert str(err.value).endswith(f"valid: {STRATEGIES.names()}")
    with pytest.raises(ValueError, match="no parameter.*valid: \\['eta', 'beta_1', 'beta_2', 'tau'\\]"):
        build_strategy("fedadam", {"eta_l": 0.1})  # the client learning rate is not the server's business
    with pytest.raises(ValueError, match="valid: none"):
        build_strategy("fedavg", {"mu": 0.1})
    assert type(build_strategy("Trimmed-Mean")).__name__ == "TrimmedMean"


# ---- properties read from the classes ---------------------------------------------

@pytest.mark.parametrize("name", STRATEGIES.names())
def test_linear_strategies_take_a_secure_mean_and_the_others_refuse_it(name: str) -> None:
    cls = STRATEGIES.get(name)
    strategy = build_strategy(name)
    global_ = small_adapter(0.0)
    if strategy.needs_every_update or cls.rank_reduction != "none":
        assert not cls.linear, f"{name} keeps or reshapes each update: it cannot be linear"
    if cls.linear:
        assert strategy.secure_input().clip_norm == 0.0
        shared = {k: v for k, v in small_adapter(0.5).items()
                  if k.split(".")[-2] in strategy.factor_plan["share"]}
        strategy.begin_round(1, global_)
        strategy.accumulate_secure(shared, weight_sum=30, count=3)
        secure = strategy.finish_round()
        plain = build_strategy(name)
        plain.begin_round(1, global_)
        plain.accumulate(shared, 30)
        expected = plain.finish_round()
        assert all(np.array_equal(secure[k], expected[k]) for k in expected)
    else:
        with pytest.raises(AggregationError):
            strategy.accumulate_secure(small_adapter(0.5), weight_sum=30, count=3)
        if not own_secure_input(cls):
            with pytest.raises(AggregationError, match="needs every individual update") as refusal:
                strategy.secure_input()
            message = str(refusal.value)
            # the advice lists every linear strategy, read from the registry
            for other in linear_strategies():
                assert other in message
            for other, other_cls in STRATEGIES.items():
                if own_secure_input(other_cls):
                    assert other in message


def test_derived_lists_agree_with_the_classes() -> None:
    assert linear_strategies() == [n for n, c in STRATEGIES.items() if c.linear]
    assert set(heterogeneous_rank_strategies()) == {n for n in STRATEGIES.names()
                                                    if build_strategy(n).supports_heterogeneous_ranks}
    assert "fedavg" in linear_strategies() and "krum" not in linear_strategies()
    assert {"hetlora", "flexlora"} <= set(heterogeneous_rank_strategies())


# ---- the generic Registry ------------------------------------------------------------

def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, modules: dict[str, str]) -> None:
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, key)


def test_registry_discovers_orders_and_refuses_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _package(tmp_path, monkeypatch, "regpkg_demo", {
        "zeta": """
            from regpkg_demo_registry import THINGS
            @THINGS.register("Zeta")
            class Zeta: pass
            """,
        "alpha": """
            from regpkg_demo_registry import THINGS
            @THINGS.register("alpha")
            class Alpha: pass
            """,
        "_private": "raise RuntimeError('modules starting with _ are not imported')\n",
        "helper": "VALUE = 1\n",
    })
    (tmp_path / "regpkg_demo_registry.py").write_text(
        "from protos.registry import Registry\n"
        "THINGS = Registry('thing', 'regpkg_demo', order=lambda name, cls: name, name_attr='name')\n")
    monkeypatch.delitem(sys.modules, "regpkg_demo_registry", raising=False)
    from regpkg_demo_registry import THINGS  # type: ignore[import-not-found]

    assert THINGS.names() == ["alpha", "zeta"]
    assert THINGS.get("ZETA").name == "zeta"
    with pytest.raises(ValueError, match="unknown thing 'beta'; valid: \\['alpha', 'zeta'\\]"):
        THINGS.get("beta")

    class Other:
        pass

    with pytest.raises(ValueError, match="registered twice"):
        THINGS.register("alpha")(Other)

    class Named:
        name = "something-else"

    with pytest.raises(ValueError, match="registered as 'named'"):
        THINGS.register("named")(Named)
    with pytest.raises(TypeError, match="abstract"):
        THINGS.register("base")(Strategy)
    with pytest.raises(ValueError, match="non-empty"):
        THINGS.register(" padded ")
    assert THINGS.unregister("Zeta").__name__ == "Zeta"
    assert "zeta" not in THINGS and THINGS.names() == ["alpha"]
    with pytest.raises(ValueError, match="not registered"):
        THINGS.unregister("zeta")


def test_register_strategy_is_the_registry_s_decorator() -> None:
    assert register_strategy == STRATEGIES.register


# ---- imports --------------------------------------------------------------------------

def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """No import cycle whichever module is imported first, and importing the
    package imports no strategy module (the registry does, when first asked)."""
    script = textwrap.dedent("""
        import importlib, pkgutil, sys
        def reset():
            for key in list(sys.modules):
                if key == "strategies" or key.startswith(("strategies.", "protos.registry")):
                    del sys.modules[key]
        import strategies
        loaded = sorted(k for k in sys.modules if k.startswith("strategies."))
        assert loaded == ["strategies.base", "strategies.lora_rank", "strategies.registry"], loaded
        modules = [m.name for m in pkgutil.iter_modules(strategies.__path__)]
        expected = None
        for name in modules:
            reset()
            importlib.import_module(f"strategies.{name}")
            from strategies import build_strategy, STRATEGIES
            names = STRATEGIES.names()
            assert expected is None or names == expected, (name, names, expected)
            expected = names
            build_strategy(names[0])
        reset()
        from strategies import build_strategy
        build_strategy("fedavg")
        print(len(expected))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(STRATEGIES.names())
