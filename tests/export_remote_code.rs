//! The transformers code an hf export carries for its family: config.json's `auto_map` names
//! classes defined, in the files beside the weights, on transformers' own classes of the family
//! (read through Python's own parser), under the export's `eab_<family>` model_type, kept when
//! the export is exported again; a peft export of such an export is the plain family again.

mod common;

use common::export::{all_layers, export, ok, tensors};
use common::{make_adapter, tiny, Arch};
use eabfit::adapters::slot_names;
use eabfit::checkpoint::Checkpoint;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// Classes, their bases and the imports of a Python file, through Python's own parser:
/// {"classes": {name: [base, ...]}, "imports": [[level, module, [name, ...]], ...],
/// "assigns": {class.attr: constant}}.
fn python_outline(path: &Path) -> Value {
    let script = r#"
import ast, json, sys
tree = ast.parse(open(sys.argv[1]).read(), sys.argv[1])
out = {"classes": {}, "imports": [], "assigns": {}}
for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef):
        out["classes"][node.name] = [ast.unparse(b) for b in node.bases]
        for st in node.body:
            if isinstance(st, ast.Assign) and isinstance(st.value, ast.Constant):
                for t in st.targets:
                    out["assigns"][f"{node.name}.{ast.unparse(t)}"] = st.value.value
    elif isinstance(node, ast.ImportFrom):
        out["imports"].append([node.level, node.module, [a.name for a in node.names]])
print(json.dumps(out))
"#;
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("python3 is needed to parse the generated transformers code");
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn hf_export_carries_transformers_code_for_its_family() {
    for (arch, family, class) in [
        (Arch::Llama, "llama", "Llama"),
        (Arch::Mistral, "mistral", "Mistral"),
    ] {
        let tiny = tiny(arch, 43);
        let work = tempfile::tempdir().unwrap();
        let adapter = work.path().join("adapter");
        make_adapter(&tiny, &adapter, true, &all_layers(), 18);
        let out = work.path().join("hf");
        ok(&export(tiny.path(), &adapter, &out, &[]));
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        let model_type = format!("eab_{family}");
        assert_eq!(cfg["model_type"], model_type.as_str());
        assert_eq!(
            cfg["architectures"],
            serde_json::json!([format!("Eab{class}ForCausalLM")])
        );
        assert_eq!(cfg["eab"]["layers"], serde_json::json!([0, 1, 2]));
        assert_eq!(cfg["eab"]["mask_first_token"], true);
        assert_eq!(cfg["eab"]["n_kv_heads"], 2);
        assert_eq!(cfg["eab"]["head_dim"], 8);
        if arch == Arch::Mistral {
            assert_eq!(cfg["sliding_window"], 5);
        }

        // auto_map names module.Class pairs; each module is a file beside the weights that
        // defines that class on transformers' own class of the family.
        let auto_map = cfg["auto_map"].as_object().expect("auto_map");
        let keys: BTreeSet<&str> = auto_map.keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["AutoConfig", "AutoModelForCausalLM"]));
        let base_module = |kind: &str| format!("transformers.models.{family}.{kind}_{family}");
        for (auto, want_base, want_module) in [
            (
                "AutoConfig",
                format!("{class}Config"),
                base_module("configuration"),
            ),
            (
                "AutoModelForCausalLM",
                format!("{class}ForCausalLM"),
                base_module("modeling"),
            ),
        ] {
            let (module, name) = auto_map[auto].as_str().unwrap().split_once('.').unwrap();
            let outline = python_outline(&out.join(format!("{module}.py")));
            assert_eq!(
                outline["classes"][name],
                serde_json::json!([want_base]),
                "{auto}"
            );
            let imported = outline["imports"].as_array().unwrap().iter().any(|i| {
                i[0] == 0
                    && i[1] == want_module.as_str()
                    && i[2]
                        .as_array()
                        .unwrap()
                        .contains(&want_base.as_str().into())
            });
            assert!(
                imported,
                "{module}.py does not import {want_base} from {want_module}"
            );
        }
        let config_outline = python_outline(&out.join("configuration_eab.py"));
        assert_eq!(
            config_outline["assigns"][format!("Eab{class}Config.model_type")],
            model_type.as_str()
        );
        let modeling = python_outline(&out.join("modeling_eab.py"));
        assert_eq!(
            modeling["classes"][format!("Eab{class}Attention")],
            serde_json::json!([format!("{class}Attention")])
        );
        // The modeling file reaches its configuration by a relative import, which transformers
        // copies along with it.
        assert!(modeling["imports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i[0] == 1
                && i[1] == "configuration_eab"
                && i[2]
                    .as_array()
                    .unwrap()
                    .contains(&format!("Eab{class}Config").into())));
        // The slot parameters are the tensors the export wrote.
        let source = std::fs::read_to_string(out.join("modeling_eab.py")).unwrap();
        assert!(
            source.contains("self.eab_k = nn.Parameter")
                && source.contains("self.eab_v = nn.Parameter")
        );
        let written = tensors(&out);
        for l in 0..3 {
            let (k, v) = slot_names(l);
            assert_eq!(written[&k].dims(), [2, 8]);
            assert!(written.contains_key(&v));
        }

        // eabfit still reads the folder, and an export of it keeps its family.
        let ckpt = Checkpoint::open(out.to_str().unwrap()).unwrap();
        assert_eq!(ckpt.config.model_type.as_deref(), Some(model_type.as_str()));
        assert!(ckpt.eab.is_some());
        let again = work.path().join("again");
        ok(&export(&out, &adapter, &again, &[]));
        let cfg2: Value =
            serde_json::from_str(&std::fs::read_to_string(again.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg2["model_type"], model_type.as_str());
        assert_eq!(cfg2["auto_map"], cfg["auto_map"]);
    }
}

#[test]
fn peft_export_of_an_eab_export_is_the_plain_family_again() {
    let tiny = tiny(Arch::Mistral, 44);
    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &all_layers(), 19);
    let hf = work.path().join("hf");
    ok(&export(tiny.path(), &adapter, &hf, &[]));
    let peft = work.path().join("peft");
    ok(&export(&hf, &adapter, &peft, &["--format", "peft"]));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "mistral");
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["MistralForCausalLM"])
    );
    assert!(cfg.get("auto_map").is_none() && cfg.get("eab").is_none());
    assert!(!peft.join("modeling_eab.py").exists());
}
