//! Loading adapters: `AdapterSet::save` then `load` gives back the very same tensors and meta;
//! another base, a tensor of the wrong shape, a missing file, or `mask_first_token` without a
//! slot in every layer is refused with a message naming the file and the field, tensor or layer.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::adapters::{batch, llama_config, meta, randomize_lora_b, to_vec64};
use eabfit::adapters::{slot_names, AdapterSet, SlotInit};
use eabfit::model::{Config, Model};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::HashMap;

/// Save then load gives back the very same tensors and meta; loading against another base, a
/// tensor of the wrong shape, or a folder without `adapter.safetensors` fails with a message
/// naming the file and the field or tensor at fault.
#[test]
fn adapter_save_load_round_trip_and_shape_errors() {
    let (_, cfg) = llama_config();
    let mut rng = StdRng::seed_from_u64(61);
    let set = AdapterSet::new(
        meta(&cfg, true, true, Some((2, 4.0, &["down", "q"], &[1]))),
        SlotInit::Normal { std: 0.5, seed: 3 },
        0.3,
        3,
        &Device::Cpu,
    )
    .unwrap();
    randomize_lora_b(&set, &mut rng, 0.3);
    let dir = tempfile::tempdir().unwrap();
    set.save(dir.path()).unwrap();

    let back = AdapterSet::load(dir.path(), &cfg, &Device::Cpu).unwrap();
    assert_eq!(back.meta, set.meta);
    assert_eq!(
        back.vars.keys().collect::<Vec<_>>(),
        set.vars.keys().collect::<Vec<_>>()
    );
    for (name, var) in &set.vars {
        let t = back.vars[name].as_tensor();
        assert_eq!(t.dims(), var.as_tensor().dims(), "{name}");
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(common::max_abs_diff(t, var.as_tensor()), 0.0, "{name}");
    }

    type Edit = (&'static str, fn(&mut Config));
    let edits: [Edit; 2] = [
        ("hidden_size", |c| c.hidden_size = 48),
        ("num_hidden_layers", |c| c.num_hidden_layers = 4),
    ];
    for (field, edit) in edits {
        let mut other = cfg.clone();
        edit(&mut other);
        let msg = AdapterSet::load(dir.path(), &other, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("loaded against another {field}"))
            .to_string();
        assert!(
            msg.contains("adapter_config.json") && msg.contains(field),
            "{field}: {msg}"
        );
    }

    let st = dir.path().join("adapter.safetensors");
    let (eab_k, _) = slot_names(1);
    for bad in [
        eab_k,
        "model.layers.1.mlp.down_proj.lora_A.weight".to_string(),
    ] {
        let mut ts = set.tensors();
        let (a, b) = ts[&bad].dims2().unwrap();
        ts.insert(
            bad.clone(),
            Tensor::zeros((a, b + 1), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&ts, &st).unwrap();
        let msg = AdapterSet::load(dir.path(), &cfg, &Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("loaded a wrong-shaped {bad}"))
            .to_string();
        assert!(
            msg.contains(&format!("`{bad}`")) && msg.contains("adapter.safetensors"),
            "{bad}: {msg}"
        );
    }

    std::fs::remove_file(&st).unwrap();
    let msg = AdapterSet::load(dir.path(), &cfg, &Device::Cpu)
        .err()
        .expect("loaded without adapter.safetensors")
        .to_string();
    assert!(msg.contains("adapter.safetensors"), "{msg}");
}

/// Regression: `mask_first_token` with a slot in only some layers used to give all-NaN logits
/// (a layer without a slot left query 0 with every key masked); it is now refused at load.
#[test]
fn mask_first_token_needs_a_slot_in_every_layer() {
    let (json, cfg) = llama_config();
    let weights: HashMap<String, Tensor> = common::weights(&json, 71);
    let ts =
        |w: &HashMap<String, Tensor>| VarBuilder::from_tensors(w.clone(), DType::F32, &Device::Cpu);
    let mut m = meta(&cfg, false, true, None);
    m.eab_layers = vec![0, 2];
    let set = AdapterSet::new(
        m,
        SlotInit::Normal { std: 1.0, seed: 1 },
        0.0,
        1,
        &Device::Cpu,
    )
    .unwrap();
    let msg = Model::load(ts(&weights), &cfg, &set.adapters())
        .map(|_| ())
        .expect_err("loaded mask_first_token with layer 1 slot-less")
        .to_string();
    assert!(
        msg.contains("mask_first_token") && msg.contains("layer 1"),
        "{msg}"
    );
    // The same slots without the mask are fine, and finite.
    let mut adapters = set.adapters();
    adapters.mask_first_token = false;
    let model = Model::load(ts(&weights), &cfg, &adapters).unwrap();
    let logits = model.logits(&batch(&[vec![1, 5, 7, 9]])).unwrap();
    let n_finite = to_vec64(&logits).iter().filter(|x| x.is_finite()).count();
    assert_eq!(n_finite, logits.elem_count());
}
