//! The weights of a model trained from scratch: f32 master copies as candle `Var`s in a
//! `VarMap` under their Hugging Face names (EAB slots under `adapters::slot_names`), their
//! initialisation, the optimizer group of each, the model built over them in the compute
//! dtype, and the Hugging Face folder they are written as.

use super::recipe::{PretrainRecipe, SlotInit};
use crate::adapters::{slot_names, Adapters, EabSlot, Gauss};
use crate::checkpoint::EabExport;
use crate::export::remote_code::Family;
use crate::fsio::{save_safetensors, write_atomic};
use crate::model::{Config, Model};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// How the optimizer treats a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// Matrices (projections, embeddings): optim.weight_decay.
    Decay,
    /// Norm gains: no decay (decaying them pulls every layer's scale toward zero).
    NoDecay,
    /// EAB slots: eab.lr_scale and eab.weight_decay.
    Slot,
}

pub struct Params {
    pub varmap: VarMap,
    pub config: Config,
    pub slot_layers: Vec<usize>,
    /// Position 0 hidden from every query (`eab.mask_first_token`).
    pub mask_first_token: bool,
    pub device: Device,
}

impl Params {
    /// Fresh weights for `cfg`: every matrix N(0, init_std) (residual projections scaled by
    /// 1/sqrt(2 * layers)), norm gains 1, slots by `r.eab`; a seeded generator makes them the
    /// same on every device.
    pub fn init(cfg: &Config, r: &PretrainRecipe, device: &Device) -> Result<Self> {
        let (d, f, v, n) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_hidden_layers,
        );
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.n_kv_heads() * cfg.head_dim(),
        );
        let std = r.model.init_std;
        let resid = std / (2.0 * n as f64).sqrt();
        let mut g = Gauss::new(r.train.seed);
        let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
        let ones = |len: usize| Tensor::ones(len, DType::F32, device);
        map.insert(
            "model.embed_tokens.weight".into(),
            g.tensor((v, d), std, device)?,
        );
        for i in 0..n {
            let p = format!("model.layers.{i}");
            for (name, shape, s) in [
                ("self_attn.q_proj", (q, d), std),
                ("self_attn.k_proj", (kv, d), std),
                ("self_attn.v_proj", (kv, d), std),
                ("self_attn.o_proj", (d, q), resid),
                ("mlp.gate_proj", (f, d), std),
                ("mlp.up_proj", (f, d), std),
                ("mlp.down_proj", (d, f), resid),
            ] {
                map.insert(format!("{p}.{name}.weight"), g.tensor(shape, s, device)?);
            }
            map.insert(format!("{p}.input_layernorm.weight"), ones(d)?);
            map.insert(format!("{p}.post_attention_layernorm.weight"), ones(d)?);
        }
        map.insert("model.norm.weight".into(), ones(d)?);
        if !cfg.tie_word_embeddings {
            map.insert("lm_head.weight".into(), g.tensor((v, d), std, device)?);
        }
        let slot_layers: Vec<usize> = match r.eab.enabled {
            true => (0..n).collect(),
            false => vec![],
        };
        let shape = (cfg.n_kv_heads(), cfg.head_dim());
        let mut slot = |init: SlotInit| match init {
            SlotInit::Zeros => Tensor::zeros(shape, DType::F32, device).map_err(Error::from),
            SlotInit::Normal => g.tensor(shape, r.eab.init_std, device),
        };
        for &l in &slot_layers {
            let (k, v) = slot_names(l);
            map.insert(k, slot(r.eab.k_init)?);
            map.insert(v, slot(r.eab.v_init)?);
        }
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Msg("parameter store poisoned".into()))?;
            // An f64 run (CPU exactness tests) keeps f64 masters.
            let master = match r.model.dtype {
                Some(crate::recipe::Dtype::F64) => DType::F64,
                _ => DType::F32,
            };
            for (name, t) in map {
                data.insert(name, Var::from_tensor(&t.to_dtype(master)?)?);
            }
        }
        Ok(Self {
            varmap,
            config: cfg.clone(),
            slot_layers,
            mask_first_token: r.eab.mask_first_token,
            device: device.clone(),
        })
    }

    /// The vars by name (sharing storage with the store: an update is seen everywhere).
    pub fn vars(&self) -> Result<BTreeMap<String, Var>> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Msg("parameter store poisoned".into()))?;
        Ok(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    pub fn count(&self) -> Result<usize> {
        Ok(self.vars()?.values().map(|v| v.elem_count()).sum())
    }

    pub fn group(name: &str) -> Group {
        if name.ends_with(".eab_k") || name.ends_with(".eab_v") {
            Group::Slot
        } else if name.ends_with("norm.weight") {
            Group::NoDecay
        } else {
            Group::Decay
        }
    }

    /// The model over the current weights in `dtype`. In f32 its weights are the vars
    /// themselves; in another dtype they are casts of them, so the gradient still reaches
    /// the f32 masters (through the cast), and a model must be built again after an update.
    pub fn model(&self, dtype: DType) -> Result<Model> {
        let vars = self.vars()?;
        let mut slots = vec![None; self.config.num_hidden_layers];
        for &l in &self.slot_layers {
            let (k, v) = slot_names(l);
            // Slots stay f32, like every adapter; attention casts them to its own dtype.
            slots[l] = Some(EabSlot {
                k: vars[&k].as_tensor().clone(),
                v: vars[&v].as_tensor().clone(),
            });
        }
        let adapters = Adapters {
            slots,
            lora: HashMap::new(),
            mask_first_token: self.mask_first_token,
        };
        let master = vars.values().next().map_or(DType::F32, |v| v.dtype());
        let vb = match dtype {
            d if d == master => VarBuilder::from_varmap(&self.varmap, d, &self.device),
            _ => {
                let cast = vars
                    .iter()
                    .filter(|(k, _)| Self::group(k) != Group::Slot)
                    .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
                    .collect::<Result<HashMap<_, _>>>()?;
                VarBuilder::from_tensors(cast, dtype, &self.device)
            }
        };
        Ok(Model::load(vb, &self.config, &adapters)?)
    }

    /// Sets every var from `file` (a `model.safetensors` this module wrote); names and shapes
    /// must match exactly.
    pub fn load(&self, file: &Path) -> Result<()> {
        let mut ts =
            candle_core::safetensors::load(file, &self.device).map_err(|e| Error::file(file, e))?;
        for (name, var) in self.vars()? {
            let t = ts
                .remove(&name)
                .ok_or_else(|| Error::file(file, format!("missing tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::file(
                    file,
                    format!(
                        "tensor `{name}` has shape {:?}, the recipe's model {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(extra) = ts.keys().next() {
            return Err(Error::file(
                file,
                format!("unexpected tensor `{extra}`: written for another recipe"),
            ));
        }
        Ok(())
    }

    /// Writes the Hugging Face files into `dir` (which exists): config.json (with the `eab`
    /// block and transformers code when there are slots), model.safetensors (f32) and the
    /// corpus's tokenizer files.
    pub fn write_hf(&self, dir: &Path, corpus: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .vars()?
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        save_safetensors(&tensors, &dir.join("model.safetensors"))?;
        let mut config = serde_json::to_value(&self.config).map_err(|e| Error::file(dir, e))?;
        let obj = config
            .as_object_mut()
            .ok_or_else(|| Error::file(dir, "config is not a JSON object"))?;
        obj.retain(|_, v| !v.is_null());
        obj.insert("hidden_act".into(), "silu".into());
        obj.insert("torch_dtype".into(), "float32".into());
        let family = Family::of(self.config.model_type.as_deref(), self.config.window())?;
        if self.slot_layers.is_empty() {
            obj.insert(
                "architectures".into(),
                vec![family.base_architecture()].into(),
            );
        } else {
            let eab = EabExport {
                slot_tensors: EabExport::SLOT_TENSORS.into(),
                layers: self.slot_layers.clone(),
                mask_first_token: self.mask_first_token,
                n_kv_heads: self.config.n_kv_heads(),
                head_dim: self.config.head_dim(),
                format_version: EabExport::FORMAT_VERSION,
            };
            obj.insert(
                "eab".into(),
                serde_json::to_value(eab).map_err(|e| Error::file(dir, e))?,
            );
            family.mark(obj);
            for (name, source) in family.files() {
                write_atomic(&dir.join(name), source.as_bytes())?;
            }
        }
        let body = serde_json::to_string_pretty(&config).map_err(|e| Error::file(dir, e))?;
        write_atomic(&dir.join("config.json"), body.as_bytes())?;
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let src = corpus.join(f);
            let body = std::fs::read(&src).map_err(|e| Error::file(&src, e))?;
            write_atomic(&dir.join(f), &body)?;
        }
        Ok(())
    }
}
