//! The SCAE suite: one TopK autoencoder per module (`attn_L`: SAE on `hook_attn_out`,
//! `mlp_L`: transcoder `ln2.hook_normalized -> hook_mlp_out`), in the order
//! `attn_0, mlp_0, attn_1, ...` (docs/MATH.md, "TopK autoencoder").
//!
//! On disk (format `scae-suite`, version 1; FORMATS.md): a folder with `suite.safetensors`
//! holding the reference's state-dict keys (`aes.<module>.encoder.weight [F, D]`,
//! `aes.<module>.encoder.bias [F]`, `aes.<module>.decoder.weight [D, F]`, `aes.<module>.b_dec
//! [D]`) and `config.json` (k, n_features, d_model, modules, model id, producing arguments,
//! and the suite's lineage: the suite it was trained from, the data each stage read, the
//! connections it was trained with); a suite finetuned through a pruned pass also holds those
//! connections as `connections.parquet`, which every tool uses by default. A bare
//! `.safetensors` with `k` and `n_features` in its metadata is accepted too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::connections::{Connections, Embedded};
pub use super::lineage::{ConnectionsRef, Lineage, LineageCheck, SuiteRef, TrainedOn};
use super::reference;
use crate::error::{Error, Result};
use crate::model::Module;
use crate::sae::AeParams;

/// `format` of a suite's config.json.
pub const FORMAT: &str = "scae-suite";
/// Current suite layout version.
pub const VERSION: u32 = 1;

/// `config.json` of a suite folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuiteConfig {
    pub format: String,
    pub version: u32,
    pub k: usize,
    pub n_features: usize,
    pub d_model: usize,
    pub modules: Vec<String>,
    /// Model the suite was trained for (id and hash as in the cache manifest), if known.
    pub model_id: Option<String>,
    pub model_hash: Option<String>,
    /// `n_features / d_model`, for reference tooling.
    pub expansion: usize,
    /// Tool and arguments that produced the suite.
    pub created_by: String,
    #[serde(default)]
    pub args: serde_json::Value,
    /// Where the suite came from (empty in suites written before it was recorded).
    #[serde(default, skip_serializing_if = "Lineage::is_empty")]
    pub lineage: Lineage,
}

impl SuiteConfig {
    /// The config of the scae suite folder `dir`, if it is one.
    pub fn read(dir: &Path) -> Option<SuiteConfig> {
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v.get("format")?.as_str()? == FORMAT).then(|| serde_json::from_value(v).ok())?
    }

    /// scae's own config kept in a reference folder that convert-suite wrote, if any.
    pub fn of_reference(dir: &Path) -> Option<SuiteConfig> {
        serde_json::from_value(reference::scae_config(dir)?).ok()
    }
}

/// The file of a suite folder holding the connections it was trained with (finetune).
pub const CONNECTIONS_FILE: &str = "connections.parquet";

/// A suite of autoencoders sharing `k` and `n_features`.
#[derive(Debug, Clone)]
pub struct Suite {
    pub k: usize,
    pub n_features: usize,
    pub d_model: usize,
    pub modules: Vec<Module>,
    pub aes: Vec<AeParams<Var>>,
    pub model_id: Option<String>,
    pub model_hash: Option<String>,
    /// Connections stored with the suite (a reference `checkpoint.pt`'s `connections`, or a
    /// scae suite folder's `connections.parquet`).
    pub embedded: Option<Embedded>,
    /// Where the suite came from (see [`Lineage`]).
    pub lineage: Lineage,
}

fn key(m: &Module, p: &str) -> String {
    format!("aes.{}.{p}", m.name())
}

impl Suite {
    /// The lineage of a suite finetuned from this one (read from `path`) on `data` with
    /// `connections`.
    pub fn child_lineage(&self, path: &Path, data: TrainedOn, connections: ConnectionsRef) -> Result<Lineage> {
        let id = self.id()?;
        let mut ancestors = vec![id.clone()];
        ancestors.extend(self.lineage.ancestors.iter().cloned());
        let mut trained_on = self.lineage.trained_on.clone();
        trained_on.push(data);
        Ok(Lineage {
            parent: Some(SuiteRef { id, path: path.display().to_string() }),
            ancestors,
            trained_on,
            connections: Some(connections),
        })
    }

    /// Load a suite: a scae suite folder (`suite.safetensors` + `config.json`), a bare
    /// `.safetensors`, or a reference suite folder (`config.json` + `checkpoint.pt`). Hub ids
    /// are resolved to a local folder before (`inputs::resolve_suite`).
    pub fn load(path: &Path, device: &Device) -> Result<Suite> {
        if path.is_dir() && reference::is_suite_dir(path) {
            return Suite::load_reference(path, device);
        }
        let (weights, cfg): (PathBuf, Option<SuiteConfig>) = if path.is_dir() {
            let cfg_path = path.join("config.json");
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| Error::input(&cfg_path, format!("cannot read suite config: {e}")))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::input(&cfg_path, format!("not valid JSON: {e}")))?;
            let (fmt, ver) = (v["format"].as_str().unwrap_or(""), v["version"].as_u64().unwrap_or(0));
            if fmt != FORMAT || ver != VERSION as u64 {
                return Err(Error::input(
                    &cfg_path,
                    format!("format {fmt} v{ver}, expected {FORMAT} v{VERSION}; hint: suites are written by train-suite and finetune"),
                ));
            }
            let cfg: SuiteConfig = serde_json::from_value(v)
                .map_err(|e| Error::input(&cfg_path, format!("malformed suite config: {e}")))?;
            (path.join("suite.safetensors"), Some(cfg))
        } else if path.is_file() {
            (path.to_path_buf(), None)
        } else {
            return Err(Error::input(path, "--suite: no such folder or file"));
        };
        let bytes = std::fs::read(&weights).map_err(|e| Error::input(&weights, format!("cannot read: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::input(&weights, format!("not a readable safetensors file: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::input(&weights, format!("not a readable safetensors file: {e}")))?;
        // `k` / `n_features` from the file's metadata: None when absent.
        let meta_usize = |k: &str| -> Result<Option<usize>> {
            match meta.metadata().as_ref().and_then(|m| m.get(k)) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| {
                    Error::input(&weights, format!("metadata `{k}`: expected a positive integer, found {v:?}"))
                }),
            }
        };
        let (k, n_features, model_id, model_hash) = match &cfg {
            Some(c) => {
                for (name, value) in [("k", c.k), ("n_features", c.n_features)] {
                    if let Some(m) = meta_usize(name)? {
                        if m != value {
                            return Err(Error::input(
                                &weights,
                                format!(
                                    "metadata `{name}` {m} disagrees with {} ({value})",
                                    path.join("config.json").display()
                                ),
                            ));
                        }
                    }
                }
                (c.k, c.n_features, c.model_id.clone(), c.model_hash.clone())
            }
            None => (
                meta_usize("k")?.ok_or_else(|| Error::input(&weights, "metadata: missing `k` (a positive integer)"))?,
                meta_usize("n_features")?
                    .ok_or_else(|| Error::input(&weights, "metadata: missing `n_features` (a positive integer)"))?,
                None,
                None,
            ),
        };
        let mut suite = Suite::from_tensors(&weights, tensors, k, n_features, model_id, model_hash)?;
        if path.is_dir() && path.join(CONNECTIONS_FILE).is_file() {
            suite.embedded = Some(Embedded { source: path.join(CONNECTIONS_FILE), tables: None });
        }
        if let Some(c) = &cfg {
            suite.lineage = c.lineage.clone();
            let cfg_path = path.join("config.json");
            let names: Vec<String> = suite.modules.iter().map(Module::name).collect();
            if c.d_model != suite.d_model {
                return Err(Error::input(
                    &cfg_path,
                    format!(
                        "field `d_model`: {} disagrees with the tensors in {} ({})",
                        c.d_model,
                        weights.display(),
                        suite.d_model
                    ),
                ));
            }
            let sorted = |v: &[String]| -> Vec<String> {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            if sorted(&c.modules) != sorted(&names) {
                return Err(Error::input(
                    &cfg_path,
                    format!(
                        "field `modules`: [{}] disagrees with the tensors in {} ([{}])",
                        c.modules.join(", "),
                        weights.display(),
                        names.join(", ")
                    ),
                ));
            }
        }
        Ok(suite)
    }

    /// A reference suite folder, its embedded connections kept as the suite's stored ones.
    fn load_reference(path: &Path, device: &Device) -> Result<Suite> {
        let raw = reference::load_suite(path, device)?;
        let report = &raw.report;
        let mut ignored = Vec::new();
        if report.model_keys > 0 {
            ignored.push(format!("{} language-model entries", report.model_keys));
        }
        if report.other_keys > 0 {
            ignored.push(format!("{} other entries", report.other_keys));
        }
        let step = report.step.map(|s| format!(", step {s}")).unwrap_or_default();
        let ignored = if ignored.is_empty() { String::new() } else { format!("; ignored {}", ignored.join(" and ")) };
        // scae's own config, when the folder was written by convert-suite: model id and hash.
        let field = |k: &str| raw.scae.as_ref().and_then(|s| s.get(k)).and_then(|v| v.as_str()).map(String::from);
        let (model_id, model_hash) = (field("model_id"), field("model_hash"));
        let mut suite = Suite::from_tensors(&raw.checkpoint, raw.tensors, raw.k, raw.n_features, model_id, model_hash)?;
        crate::note!(
            "{}: reference suite ({}{step}), {} modules, F {}, k {}{ignored}",
            path.display(),
            raw.report.layout,
            suite.modules.len(),
            suite.n_features,
            suite.k
        );
        suite.embedded = raw.connections.map(|t| Embedded { source: raw.checkpoint.clone(), tables: Some(t) });
        if let Some(c) = raw.scae.and_then(|v| serde_json::from_value::<SuiteConfig>(v).ok()) {
            suite.lineage = c.lineage;
        }
        Ok(suite)
    }

    /// Write this suite as a reference suite folder into `dir`: `config.json` (`k`,
    /// `n_features`, and scae's own config `scae` when known) and `checkpoint.pt` with `conns`
    /// embedded; `parquet`, the file the connections came from, is kept beside them as
    /// [`reference::SIDECAR`].
    pub fn write_reference(
        &self,
        dir: &Path,
        scae: Option<&SuiteConfig>,
        conns: Option<&Connections>,
        parallel: bool,
        parquet: Option<&Path>,
    ) -> Result<()> {
        let mut cfg = serde_json::json!({"k": self.k, "n_features": self.n_features});
        if let Some(s) = scae {
            cfg[reference::SCAE_KEY] = serde_json::to_value(s).expect("config serializes");
        }
        let text = serde_json::to_string(&cfg).expect("json");
        crate::util::io::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let tables = conns.map(|c| c.reference_tables(parallel));
        let params: Vec<(String, Tensor)> =
            self.named_vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let downs: Vec<String> = self.modules.iter().map(Module::name).collect();
        reference::write_checkpoint(&dir.join(reference::CHECKPOINT), &params, &downs, tables.as_deref())?;
        if let Some(p) = parquet {
            let bytes = std::fs::read(p).map_err(|e| Error::input(p, format!("cannot read: {e}")))?;
            crate::util::io::write_atomic(&dir.join(reference::SIDECAR), &bytes)?;
        }
        Ok(())
    }

    /// Build from a state dict; `source` names the file in errors.
    pub fn from_tensors(
        source: &Path,
        mut t: HashMap<String, Tensor>,
        k: usize,
        n_features: usize,
        model_id: Option<String>,
        model_hash: Option<String>,
    ) -> Result<Suite> {
        let mut n_layers = 0;
        while t.contains_key(&format!("aes.attn_{n_layers}.encoder.weight")) {
            n_layers += 1;
        }
        if n_layers == 0 {
            return Err(Error::input(source, "no tensor `aes.attn_0.encoder.weight`: not a suite"));
        }
        let d_model = t[&format!("aes.attn_0.encoder.weight")].dim(1)?;
        if k == 0 || k > n_features {
            return Err(Error::input(source, format!("k {k}: expected 1..=n_features ({n_features})")));
        }
        let modules = Module::all(n_layers);
        let mut aes = Vec::new();
        for m in &modules {
            let mut take = |p: &str, shape: &[usize]| -> Result<Var> {
                let name = key(m, p);
                let x = t.remove(&name).ok_or_else(|| Error::input(source, format!("missing tensor `{name}`")))?;
                if x.dims() != shape {
                    return Err(Error::input(
                        source,
                        format!("tensor `{name}`: expected shape {shape:?}, found {:?}", x.dims()),
                    ));
                }
                if !x.dtype().is_float() {
                    return Err(Error::input(
                        source,
                        format!("tensor `{name}`: expected floating-point values, found {:?}", x.dtype()),
                    ));
                }
                let x = x.to_dtype(DType::F32)?;
                if !crate::util::all_finite(&x)? {
                    return Err(Error::input(
                        source,
                        format!("tensor `{name}`: expected finite values, found NaN or infinite ones"),
                    ));
                }
                Ok(Var::from_tensor(&x)?)
            };
            aes.push(AeParams {
                w_enc: take("encoder.weight", &[n_features, d_model])?,
                b_enc: take("encoder.bias", &[n_features])?,
                w_dec: take("decoder.weight", &[d_model, n_features])?,
                b_dec: take("b_dec", &[d_model])?,
            });
        }
        let mut extra: Vec<&String> = t.keys().filter(|name| name.starts_with("aes.")).collect();
        extra.sort();
        if let Some(name) = extra.first() {
            return Err(Error::input(
                source,
                format!("unexpected tensor `{name}`: the suite's modules are attn_0 .. mlp_{}", n_layers - 1),
            ));
        }
        Ok(Suite {
            k,
            n_features,
            d_model,
            modules,
            aes,
            model_id,
            model_hash,
            embedded: None,
            lineage: Lineage::default(),
        })
    }

    /// The suite's fingerprint: `blake3:<hex>` over `k` and every parameter (state-dict key,
    /// shape and f32 values, in suite order), whatever file layout it was read from, so a suite
    /// converted to the reference's layout and back is the same suite.
    pub fn id(&self) -> Result<String> {
        let mut h = crate::util::fingerprint::TensorHasher::new("scae-suite-v1");
        h.add_str(&format!("k={}", self.k));
        for (name, v) in self.named_vars() {
            let t = v.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?.contiguous()?;
            h.add_tensor(&name, &t)?;
        }
        Ok(h.finish())
    }

    /// The module with this name, if the suite has it.
    pub fn find(&self, name: &str) -> Option<usize> {
        Module::parse(name).and_then(|m| self.modules.iter().position(|x| *x == m))
    }

    /// Every parameter with its state-dict key, in suite order (b_dec, encoder.weight,
    /// encoder.bias, decoder.weight per module, as PyTorch's `parameters()`).
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (m, ae) in self.modules.iter().zip(&self.aes) {
            out.extend(ae.named().into_iter().map(|(suffix, v)| (key(m, suffix), v)));
        }
        out
    }

    /// Save this suite, read from the folder `from`, in scae's layout into `dir`: a folder scae
    /// wrote keeps its own config (model, creator, arguments), so the round trip is exact;
    /// otherwise `created_by` and this process's arguments are recorded.
    pub fn save_converted(&self, dir: &Path, from: &Path, created_by: &str) -> Result<()> {
        let kept = SuiteConfig::of_reference(from)
            .filter(|c| c.k == self.k && c.n_features == self.n_features && c.d_model == self.d_model);
        let mut suite = self.clone();
        let (created_by, args) = match &kept {
            Some(c) => {
                suite.model_id = c.model_id.clone();
                suite.model_hash = c.model_hash.clone();
                (c.created_by.clone(), c.args.clone())
            }
            None => (created_by.to_string(), serde_json::json!({"argv": std::env::args().collect::<Vec<_>>()})),
        };
        suite.save(dir, &created_by, args)
    }

    /// Every module's current parameter values as host buffers.
    pub fn host_params(&self) -> Result<Vec<AeParams<Vec<f32>>>> {
        self.aes.iter().map(AeParams::to_host).collect()
    }

    /// Overwrite every module's parameters with host values.
    pub fn set_params(&self, params: &[AeParams<Vec<f32>>]) -> Result<()> {
        self.aes.iter().zip(params).try_for_each(|(ae, p)| ae.set_host(p))
    }

    /// This suite (modules, metadata, lineage) holding `params` instead, as host variables.
    pub fn with_params(&self, params: &[AeParams<Vec<f32>>]) -> Result<Suite> {
        let (d, f) = (self.d_model, self.n_features);
        let aes = params.iter().map(|p| AeParams::<Var>::from_host(p, d, f, &Device::Cpu)).collect::<Result<_>>()?;
        Ok(Suite { aes, ..self.clone() })
    }

    /// A CPU suite of `modules` holding `params` (checked as a loaded suite is).
    pub fn from_params(
        params: &[AeParams<Vec<f32>>],
        modules: &[Module],
        k: usize,
        d: usize,
        f: usize,
    ) -> Result<Suite> {
        let dev = Device::Cpu;
        let shapes = AeParams::shapes(d, f);
        let mut map = HashMap::new();
        for (m, p) in modules.iter().zip(params) {
            for ((suffix, v), (_, shape)) in p.named().into_iter().zip(shapes.named()) {
                map.insert(key(m, suffix), Tensor::from_slice(v, shape.as_slice(), &dev)?);
            }
        }
        Suite::from_tensors(Path::new("(training)"), map, k, f, None, None)
    }

    /// The state-dict key of the first parameter holding NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        for (name, v) in self.named_vars() {
            if !crate::util::all_finite(v.as_tensor())? {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Write `dir/suite.safetensors` and `dir/config.json` (each via tmp + rename); a suite
    /// with non-finite parameters is refused (no reader would accept it).
    pub fn save(&self, dir: &Path, created_by: &str, args: serde_json::Value) -> Result<()> {
        if let Some(name) = self.first_non_finite()? {
            return Err(Error::Usage(format!(
                "tensor `{name}` is not finite; refusing to write a suite to {}",
                dir.display()
            )));
        }
        let tensors: Vec<(String, Tensor)> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| Ok((k, v.as_tensor().to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let meta: std::collections::BTreeMap<String, String> = [
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("k".to_string(), self.k.to_string()),
            ("n_features".to_string(), self.n_features.to_string()),
        ]
        .into();
        crate::util::io::write_safetensors(&dir.join("suite.safetensors"), tensors, &meta)?;
        let cfg = SuiteConfig {
            format: FORMAT.into(),
            version: VERSION,
            k: self.k,
            n_features: self.n_features,
            d_model: self.d_model,
            modules: self.modules.iter().map(Module::name).collect(),
            model_id: self.model_id.clone(),
            model_hash: self.model_hash.clone(),
            expansion: self.n_features / self.d_model.max(1),
            created_by: created_by.to_string(),
            args,
            lineage: self.lineage.clone(),
        };
        let json = serde_json::to_string_pretty(&cfg).expect("config serializes");
        crate::util::io::write_atomic(&dir.join("config.json"), json.as_bytes())
    }

    /// Remove a suite folder's result files (`suite.safetensors`, `config.json`,
    /// `connections.parquet`), e.g. before a run that writes new ones.
    pub fn remove_files(dir: &Path) -> Result<()> {
        for name in ["suite.safetensors", "config.json", CONNECTIONS_FILE] {
            let p = dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }
}
