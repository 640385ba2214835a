"""
The provider as Airflow sees it: ``get_provider_info()`` against the schema shipped inside the installed
Airflow, every module and extra link listed, both connection types with their form (the declarative
metadata of Airflow 3.2+ and the hook methods older forms call, from one source), and the ``airflow
providers`` commands run in a subprocess with a private ``AIRFLOW_HOME``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from airflow.sdk import BaseOperatorLink

import airflow
import airflow_provider_hpc
from airflow_provider_hpc import get_provider_info
from airflow_provider_hpc.hooks import _forms
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import RescaleHook

PACKAGE = "airflow_provider_hpc"
HOOKS = {"muse": MuseHook, "rescale": RescaleHook}
AIRFLOW = Path(sys.executable).with_name("airflow")


@pytest.fixture(scope="module")
def info() -> dict[str, Any]:
    """The provider info, as Airflow's providers manager receives it."""
    return get_provider_info()


def public_modules(kind: str) -> set[str]:
    """Every public module of a sub-package (``operators``, ``sensors``...), found on disk."""
    package = importlib.import_module(f"{PACKAGE}.{kind}")
    return {f"{PACKAGE}.{kind}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}


def listed_modules(info: dict[str, Any], section: str) -> set[str]:
    """The modules a section of the provider info lists, whatever the integration."""
    return {module for entry in info.get(section, []) for module in entry["python-modules"]}


def test_valid_against_the_schema_shipped_with_airflow(info: dict[str, Any]) -> None:
    """The installed Airflow's own ``provider_info.schema.json`` accepts the provider info."""
    schema_path = Path(airflow.__file__).with_name("provider_info.schema.json")
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(info, schema)
    assert info["package-name"] == "airflow-provider-hpc"
    assert info["versions"] == [airflow_provider_hpc.__version__]
    json.dumps(info)  # plain data only


def test_the_entry_point_names_get_provider_info() -> None:
    """Airflow finds the provider through the ``apache_airflow_provider`` entry point."""
    from importlib.metadata import entry_points

    (point,) = [p for p in entry_points(group="apache_airflow_provider") if p.value.startswith(PACKAGE)]
    assert point.load() is get_provider_info


@pytest.mark.parametrize("section", ["hooks", "operators", "sensors", "triggers"])
def test_every_module_is_listed_and_importable(info: dict[str, Any], section: str) -> None:
    """Each public module under hooks/, operators/, sensors/ and triggers/ is listed, and each listed one imports."""
    assert listed_modules(info, section) == public_modules(section)
    integrations = {i["integration-name"] for i in info["integrations"]}
    for entry in info[section]:
        assert entry["integration-name"] in integrations
        for module in entry["python-modules"]:
            importlib.import_module(module)


def link_classes() -> set[str]:
    """Every operator link class defined under ``links/``."""
    found = set()
    for module_name in public_modules("links"):
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseOperatorLink) and value.__module__ == module_name:
                found.add(f"{module_name}.{name}")
    return found


def test_every_extra_link_is_listed(info: dict[str, Any]) -> None:
    """The links defined under links/, and every link an operator or sensor shows, are in ``extra-links``."""
    listed = set(info["extra-links"])
    assert listed == link_classes()
    used = set()
    for module_name in listed_modules(info, "operators") | listed_modules(info, "sensors"):
        for value in vars(importlib.import_module(module_name)).values():
            for link in getattr(value, "operator_extra_links", ()) if inspect.isclass(value) else ():
                used.add(f"{type(link).__module__}.{type(link).__name__}")
    assert used and used <= listed


def test_both_connection_types_point_at_their_hooks(info: dict[str, Any]) -> None:
    """``muse`` and ``rescale`` name hooks whose ``conn_type``, ``hook_name`` and attributes agree."""
    types_ = {c["connection-type"]: c for c in info["connection-types"]}
    assert set(types_) == {"muse", "rescale"}
    for conn_type, hook in HOOKS.items():
        entry = types_[conn_type]
        module, _, name = entry["hook-class-name"].rpartition(".")
        assert getattr(importlib.import_module(module), name) is hook
        assert (hook.conn_type, hook.hook_name) == (conn_type, entry["hook-name"])
        assert hook.default_conn_name == f"{conn_type}_default"
        assert getattr(hook(), hook.conn_name_attr) == hook.default_conn_name
        assert callable(hook.test_connection)


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_form_fields_have_labels_and_the_password_is_sensitive(info: dict[str, Any], conn_type: str) -> None:
    """Every extra field has a label and a JSON-schema type; secrets are password fields."""
    entry = next(c for c in info["connection-types"] if c["connection-type"] == conn_type)
    for name, field in entry["conn-fields"].items():
        assert field["label"] and field["schema"]["type"], name
    behaviour = entry["ui-field-behaviour"]
    assert behaviour["relabeling"]["host"] and behaviour["placeholders"]["host"].startswith("http")
    assert "password" in behaviour["placeholders"]
    assert {"verify", "ca_bundle", "connect_timeout", "read_timeout", "max_attempts"} <= set(entry["conn-fields"])
    if conn_type == "muse":
        assert entry["conn-fields"]["token"]["schema"]["format"] == "password"
    else:
        assert "login" in behaviour["hidden-fields"] and behaviour["relabeling"]["password"] == "API key"


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_hook_behaviour_method_matches_the_provider_info(info: dict[str, Any], conn_type: str) -> None:
    """``get_ui_field_behaviour`` (older forms) says what ``ui-field-behaviour`` says."""
    entry = next(c for c in info["connection-types"] if c["connection-type"] == conn_type)
    expected = entry["ui-field-behaviour"]
    assert HOOKS[conn_type].get_ui_field_behaviour() == {
        "hidden_fields": expected["hidden-fields"],
        "relabeling": expected["relabeling"],
        "placeholders": expected["placeholders"],
    }


@pytest.fixture
def fake_wtforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for Flask-AppBuilder and WTForms, built from the mocks Airflow's own API server uses."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService as Meta

    def module(name: str, **attrs: Any) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, made)
        return made

    module(
        "wtforms",
        StringField=Meta.MockStringField,
        IntegerField=Meta.MockIntegerField,
        PasswordField=Meta.MockPasswordField,
        BooleanField=Meta.MockBooleanField,
    )
    module("wtforms.validators", Optional=Meta.MockOptional, any_of=Meta.MockEnum)
    module("flask_babel", lazy_gettext=str)
    module("flask_appbuilder")
    module("flask_appbuilder.fieldwidgets", BS3TextFieldWidget=Meta.MockAnyWidget, BS3PasswordFieldWidget=Meta.MockAnyWidget)


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_hook_widgets_method_matches_the_provider_info(info: dict[str, Any], fake_wtforms: None, conn_type: str) -> None:
    """``get_connection_form_widgets`` (older forms) gives the same fields, labels, defaults and secrets."""
    entry = next(c for c in info["connection-types"] if c["connection-type"] == conn_type)
    widgets = HOOKS[conn_type].get_connection_form_widgets()
    assert set(widgets) == set(entry["conn-fields"])
    for name, widget in widgets.items():
        spec, param = entry["conn-fields"][name], widget.param.dump()
        assert param["schema"]["title"] == spec["label"]
        default = spec["schema"].get("default")
        assert param["value"] == (str(default) if isinstance(default, float | int) and not isinstance(default, bool)
                                  and "integer" not in spec["schema"]["type"] else default)
        assert (param["schema"].get("format") == "password") == (spec["schema"].get("format") == "password")
        if "enum" in spec["schema"]:
            assert param["schema"]["enum"] == spec["schema"]["enum"]


def test_airflow_connection_form_shows_both_types() -> None:
    """The API behind the Airflow 3 connection form lists both types with their labels, placeholders and extras."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    meta = {m.connection_type: m for m in HookMetaService.hook_meta_data() if m.connection_type in HOOKS}
    assert set(meta) == set(HOOKS)
    muse, rescale = meta["muse"], meta["rescale"]
    assert muse.hook_name == "Muse (INRAE cluster web service)"
    assert (muse.standard_fields.host.title, muse.standard_fields.host.placeholder) == ("Base URL", _forms.MUSE_DOC_URL)
    assert muse.standard_fields.login.title == "Username"
    # Port is shown: the connection list's Test button needs the stored port (docs/connections.md, "The Test button").
    assert not muse.standard_fields.port.hidden and muse.standard_fields.port.title == _forms.MUSE_PORT_LABEL
    assert muse.standard_fields.url_schema.hidden
    assert muse.extra_fields["token"]["schema"]["format"] == "password"
    assert rescale.standard_fields.password.title == "API key"
    assert rescale.standard_fields.login.hidden
    assert rescale.extra_fields["api_version"]["value"] == "v1"
    assert rescale.extra_fields["read_timeout"]["schema"]["title"] == "Read timeout (s)"


def test_both_types_are_testable_in_the_ui() -> None:
    """The providers manager sees a ``test_connection`` on both hooks (the form's Test button)."""
    from airflow.providers_manager import ProvidersManager

    with warnings.catch_warnings():  # deprecated for task code; still what the API server asks
        warnings.simplefilter("ignore")
        hooks = ProvidersManager().hooks
    for conn_type in HOOKS:
        hook = hooks[conn_type]
        assert hook is not None and hook.connection_testable and hook.package_name == "airflow-provider-hpc"


@pytest.mark.slow
def test_airflow_providers_commands_list_the_provider(tmp_path: Path) -> None:
    """``airflow providers list`` and ``airflow providers hooks``, run for real with a private AIRFLOW_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow-home"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    commands = {
        name: subprocess.Popen(
            [str(AIRFLOW), "providers", name, "--output", "json"], env=env, cwd=tmp_path,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("list", "hooks")
    }
    outputs = {}
    for name, process in commands.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        outputs[name] = json.loads(out[out.index("[") :])

    providers = {p["package_name"]: p for p in outputs["list"]}
    assert providers["airflow-provider-hpc"]["version"] == airflow_provider_hpc.__version__
    hooks = {h["connection_type"]: h for h in outputs["hooks"]}
    assert hooks["muse"]["class"] == "airflow_provider_hpc.hooks.muse.MuseHook"
    assert hooks["rescale"]["class"] == "airflow_provider_hpc.hooks.rescale.RescaleHook"
    assert {h["package_name"] for t, h in hooks.items() if t in HOOKS} == {"airflow-provider-hpc"}
    assert hooks["muse"]["conn_id_attribute_name"] == "muse_conn_id"
