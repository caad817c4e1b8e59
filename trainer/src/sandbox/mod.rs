//! The knowledge sandbox: a generated world, tiny GPT-2/OPT-architecture models pretrained on
//! it through the model server's training jobs, and the whole weak-to-strong study on top
//! (`trainer experiment`). See `docs/sandbox.md` for why this is a faithful miniature of the
//! paper's setting and where it is not.
//!
//! Data flow: [`ExperimentConfig`] → `world::World` (facts, corpus, HH splits, written under
//! `OUT/world/`) → BPE tokenizer (`OUT/world/tokenizer/`) → one CAUSAL_LM job per model size,
//! exported to `OUT/models/<name>-<hash>/` (reused while the hash of world, tokenizer, model
//! config and pretraining config is unchanged) → a zero-shot knowledge probe → the study
//! (`OUT/runs/`) → the report (`OUT/report/`).

pub mod experiment;
pub mod world;

use crate::spec::SpecError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use model_server::W2sClient;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use superficial_models::config::{Gpt2Config, OptConfig};
use superficial_models::model::parameter_count;
use superficial_models::{ModelConfig, RewardReadout, TextTokenizer};
use w2s_proto::v1 as pb;
use w2s_proto::v1::upload_dataset_request::Item;

use crate::spec::{
    ConflictSpec, ConflictTarget, DataFiles, ModelSpec, OnPolicySpec, Scenario, Setting, Sizes,
    StageHyper, StudySpec,
};
use crate::study::Progress;
use world::{World, WorldConfig};

/// Special tokens of the sandbox tokenizer, at ids 0, 1, 2 (OPT's pad and bos/eos ids are 1
/// and 2; GPT-2's end-of-text is 0).
const SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<pad>", "</s>"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gpt2,
    Opt,
}

/// One model size of a family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeSpec {
    pub name: String,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Share of the mentioned entities, most frequent first, whose facts this size's
    /// pretraining corpus states (the rest of each document is kept; the cut corpus is
    /// repeated to the full one's length, so every size takes the same steps).
    #[serde(default = "read_everything")]
    pub reads: f64,
}

fn read_everything() -> f64 {
    1.0
}

impl SizeSpec {
    fn new(name: &str, width: usize, layers: usize, heads: usize, reads: f64) -> Self {
        Self {
            name: name.into(),
            width,
            layers,
            heads,
            reads,
        }
    }

    /// How many entities (most frequent first) this size reads about, of `mentioned`.
    pub fn entities_read(&self, mentioned: usize) -> usize {
        ((self.reads * mentioned as f64).ceil() as usize).clamp(1, mentioned.max(1))
    }
}

/// How every model is pretrained on the corpus (one CAUSAL_LM job each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub epochs: u32,
    pub lr: f64,
    pub batch_size: u32,
    pub max_ctx: u32,
    pub seed: u64,
    /// Shards per minibatch (as `StageHyper::shards`; part of the pretrained cache's key).
    pub shards: u32,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            lr: 3e-3,
            // 16 left the lookup unlearned in some draws at every width; 4 (four times the
            // steps, 1.4x the time on 2 cores) is the largest with which every size learned
            // every fact it read in eight draws of eight.
            batch_size: 4,
            max_ctx: 96,
            seed: 0,
            shards: 2,
        }
    }
}

/// One set of pretrained models and the study seeds that fine-tune it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainingDraw {
    pub pretrain_seed: u64,
    pub study_seeds: Vec<u64>,
}

/// Everything `trainer experiment` does, with defaults that fit the 15-minute budget on a
/// 2-core CPU. A configuration file may give any subset of the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    pub world: WorldConfig,
    pub tokenizer_vocab: usize,
    /// Positions of every model (sandbox dialogues are short).
    pub context: usize,
    /// The family whose sizes form the weak-to-strong grid.
    pub family: Family,
    /// Pretrain both families (the other one is probed but not put through the grid).
    pub pretrain_both_families: bool,
    pub gpt2: Vec<SizeSpec>,
    pub opt: Vec<SizeSpec>,
    /// The OPT sizes' activation. OPT's own is `relu`; with it the tiny OPT sizes learned no
    /// fact in pretraining (opt-m: 0.54 of the 1-3-mention facts, the majority class, at the
    /// loss GPT-2-m reaches while knowing 0.92 of them), with `gelu_new` they learn them as the
    /// GPT-2 sizes do (opt-m 1.00). See docs/sandbox.md.
    pub opt_activation: String,
    pub pretrain: PretrainConfig,
    pub seeds: Vec<u64>,
    /// Each study seed `s` fine-tunes its own pretraining draw (models pretrained with
    /// `pretrain.seed + s`), so the spread across seeds covers pretraining as well as
    /// fine-tuning. Off: every seed fine-tunes the one draw of `pretrain.seed`.
    pub pretrain_per_seed: bool,
    pub scenarios: Vec<Scenario>,
    pub settings: Vec<Setting>,
    /// Run the bootstrap chain smallest → middle → largest (preference scenarios).
    pub bootstrap: bool,
    pub reward: StageHyper,
    pub preference: StageHyper,
    /// The conflicting goals and their doses (the sandbox's explicit conflict pulls towards
    /// the compliant response: helpfulness against harmlessness, as in the paper).
    pub conflict: ConflictSpec,
    /// The on-policy scenario's loop (when `scenarios` has `on_policy`).
    pub on_policy: OnPolicySpec,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            world: WorldConfig::default(),
            tokenizer_vocab: 768,
            context: 96,
            family: Family::Gpt2,
            // The OPT sizes are not in the default grid; pretraining them for every draw cost a
            // third of the pretraining time (`--family opt` runs them).
            pretrain_both_families: false,
            // Each size reads the facts of a larger share of the entities, most frequent first,
            // and learns what it reads: what a size knows is what it read. With widths alone,
            // whether a tiny model learns the name → property lookup at all was a lottery of
            // the draw (a 1-layer model never did; 32-48 wide ones in some draws only), so no
            // draw had a ladder; 32- and 40-wide models reading 40 % of the entities still
            // learned only 0.6-0.9 of them in one draw of eight. gpt2-m reads 0.65: at 0.7 its
            // zero-shot accuracy (0.78-0.88) came within 0.05 of gpt2-l's in one draw of eight;
            // at 0.65 (0.77-0.86) every step of every draw is at least +0.06 (pretraining probe
            // only). docs/sandbox.md has the scans.
            gpt2: vec![
                SizeSpec::new("gpt2-xs", 24, 2, 2, 0.1),
                SizeSpec::new("gpt2-s", 48, 2, 4, 0.4),
                SizeSpec::new("gpt2-m", 56, 2, 4, 0.65),
                SizeSpec::new("gpt2-l", 64, 2, 4, 1.0),
            ],
            opt: vec![
                SizeSpec::new("opt-xs", 24, 2, 2, 0.1),
                SizeSpec::new("opt-s", 48, 2, 4, 0.4),
                SizeSpec::new("opt-m", 56, 2, 4, 0.7),
            ],
            opt_activation: "gelu_new".into(),
            pretrain: PretrainConfig::default(),
            // No finding may rest on one seed: ceilings alone move ±0.08 between seeds, and three
            // draws (t(2) = 4.30) detect only effects of ~0.3 (docs/study.md).
            seeds: (0..8).collect(),
            // One pretraining draw moved the headline DS_new − chance more than the three
            // fine-tuning seeds' intervals admitted (docs/sandbox.md): seeds vary both.
            pretrain_per_seed: true,
            scenarios: vec![Scenario::Reward, Scenario::Simpo],
            settings: vec![Setting::None, Setting::Implicit, Setting::Explicit],
            bootstrap: true,
            // A head on the last token alone never read out what the models know (gpt2-l's
            // ceilings 0.49-0.79 against 0.84-0.93 zero-shot, at any rate or length tried): the
            // reward adds the model's own mean response log-prob, so it starts from the
            // zero-shot comparison (gpt2-l 0.92 / 0.91 / 0.84). 1e-4 for 4 epochs moves the
            // students (3e-5 left them at their zero-shot answers, where no label or conflict
            // could show). docs/sandbox.md has the numbers.
            reward: StageHyper {
                lr: 1e-4,
                batch_size: 32,
                minibatch_size: 32,
                epochs: 4,
                max_ctx: 96,
                eval_batch: 64,
                readout: RewardReadout::LastTokenAndMeanLogprob,
                ..StageHyper::default()
            },
            // SimPO turns any lean of its labels into a constant policy at 3e-4: 59 of the 87
            // SimPO students of the three-draw default preferred the compliant response on
            // ≥ 97 % of the test pairs; at 1e-4, 3 of 87, with ceilings as good (gpt2-l 0.92 /
            // 0.92 / 0.85 against 0.94 / 0.89 / 0.84). docs/sandbox.md has the numbers.
            preference: StageHyper {
                lr: 1e-4,
                batch_size: 32,
                minibatch_size: 32,
                epochs: 2,
                sft_epochs: 1,
                max_ctx: 96,
                eval_batch: 64,
                ..StageHyper::preference_default()
            },
            // Doses of each conflict (α = 0.5 is the paper's). Students that know what they
            // read do not move at the doses that bit students whose teachers knew nothing
            // (α 0.025-0.1: tax 0.000 ± 0.004, compliant share unchanged); α 0.25 / 1 / 4 move
            // their compliance (0.43 → 0.48 / 0.55 / 0.56 for reward) without collapsing any
            // (three draws; chosen on compliance and collapse counts, docs/sandbox.md). The
            // implicit doses are subsets of the world's helpful split (`world.helpful_pairs`):
            // 1, 2 and 3 helpful pairs per weakly labelled one (the paper mixes 1:1); up to
            // 120 they leave compliance where it was, 200 / 400 / 600 move it 0.57 / 0.65 /
            // 0.77 for reward (three draws, chosen the same way).
            conflict: ConflictSpec {
                explicit_target: ConflictTarget::Compliant,
                explicit_alphas: vec![0.25, 1.0, 4.0],
                implicit_helpful_pairs: vec![200, 400, 600],
            },
            on_policy: OnPolicySpec::default(),
        }
    }
}

impl ExperimentConfig {
    /// The `--quick` configuration: fewer pairs, the two smallest sizes of the grid family,
    /// one seed; every setting and dose of the default.
    pub fn quick() -> Self {
        let base = Self::default();
        Self {
            world: WorldConfig {
                corpus_passes: 130,
                train_gt_pairs: 160,
                train_w2s_pairs: 160,
                test_pairs: 200,
                ..WorldConfig::default()
            },
            pretrain_both_families: false,
            gpt2: base.gpt2[..2].to_vec(),

            seeds: vec![0],
            bootstrap: false,
            scenarios: vec![Scenario::Reward, Scenario::Simpo, Scenario::OnPolicy],
            ..base
        }
    }

    /// The `--on-policy` configuration: the default's world, models and draws, with on-policy
    /// students only — no conflict, and the explicit conflict at α 1 and 4 — on every pair.
    /// Apart from the default so that each stays within its time budget.
    pub fn on_policy() -> Self {
        let base = Self::default();
        Self {
            scenarios: vec![Scenario::OnPolicy],
            settings: vec![Setting::None, Setting::Explicit],
            bootstrap: false,
            conflict: ConflictSpec {
                explicit_alphas: vec![1.0, 4.0],
                ..base.conflict.clone()
            },
            ..base
        }
    }

    /// The pretraining draws and the study seeds that fine-tune each: one draw per seed
    /// (`pretrain.seed + s`) with `pretrain_per_seed`, else one draw for all seeds.
    pub fn pretraining_draws(&self) -> Vec<PretrainingDraw> {
        if self.pretrain_per_seed {
            self.seeds
                .iter()
                .map(|&seed| PretrainingDraw {
                    pretrain_seed: self.pretrain.seed.wrapping_add(seed),
                    study_seeds: vec![seed],
                })
                .collect()
        } else {
            vec![PretrainingDraw {
                pretrain_seed: self.pretrain.seed,
                study_seeds: self.seeds.clone(),
            }]
        }
    }

    /// This configuration with the pretraining seed of `draw` (what `pretrain_models` and
    /// `study_spec` of that draw see).
    pub fn for_draw(&self, draw: &PretrainingDraw) -> Self {
        let mut config = self.clone();
        config.pretrain.seed = draw.pretrain_seed;
        config.seeds = draw.study_seeds.clone();
        config
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.world.validate()?;
        if self.tokenizer_vocab < 300 {
            return Err("tokenizer_vocab must be at least 300 (256 bytes + specials)".into());
        }
        if superficial_models::config::Activation::parse(&self.opt_activation).is_none() {
            return Err(format!(
                "opt_activation `{}`: use relu, gelu or gelu_new",
                self.opt_activation
            )
            .into());
        }
        let grid = self.family_sizes(self.family);
        if grid.len() < 2 {
            return Err("the grid family needs at least two sizes".into());
        }
        if self.bootstrap && grid.len() < 3 {
            return Err("the bootstrap chain needs at least three sizes".into());
        }
        for size in self.gpt2.iter().chain(&self.opt) {
            if size.width == 0 || size.layers == 0 || size.heads == 0 {
                return Err(
                    format!("size {}: width, layers, heads must be positive", size.name).into(),
                );
            }
            if !(size.reads > 0.0 && size.reads <= 1.0) {
                return Err(format!(
                    "size {}: reads must lie in (0, 1], not {}",
                    size.name, size.reads
                )
                .into());
            }
            if !size.width.is_multiple_of(size.heads) {
                return Err(format!("size {}: heads must divide width", size.name).into());
            }
        }
        if self.seeds.is_empty() || self.scenarios.is_empty() || self.settings.is_empty() {
            return Err("seeds, scenarios and settings must not be empty".into());
        }
        let mut distinct = self.seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != self.seeds.len() {
            return Err(format!("seeds {:?} repeat a seed", self.seeds).into());
        }
        if self.pretrain.epochs == 0 || self.pretrain.batch_size == 0 {
            return Err("pretrain epochs and batch_size must be positive".into());
        }
        Ok(())
    }

    pub fn family_sizes(&self, family: Family) -> &[SizeSpec] {
        match family {
            Family::Gpt2 => &self.gpt2,
            Family::Opt => &self.opt,
        }
    }

    /// The architecture of one size, with this world's vocabulary.
    pub fn model_config(&self, family: Family, size: &SizeSpec, vocab: usize) -> ModelConfig {
        match family {
            Family::Gpt2 => ModelConfig::Gpt2(Gpt2Config {
                vocab_size: vocab,
                n_positions: self.context,
                n_embd: size.width,
                n_layer: size.layers,
                n_head: size.heads,
                n_inner: None,
                activation_function: "gelu_new".into(),
                layer_norm_epsilon: 1e-5,
                scale_attn_weights: true,
                scale_attn_by_inverse_layer_idx: false,
                tie_word_embeddings: true,
                bos_token_id: 0,
                eos_token_id: 0,
            }),
            Family::Opt => ModelConfig::Opt(OptConfig {
                vocab_size: vocab,
                hidden_size: size.width,
                num_hidden_layers: size.layers,
                ffn_dim: 4 * size.width,
                max_position_embeddings: self.context,
                num_attention_heads: size.heads,
                do_layer_norm_before: true,
                word_embed_proj_dim: Some(size.width),
                activation_function: self.opt_activation.clone(),
                enable_bias: true,
                layer_norm_elementwise_affine: true,
                remove_final_layer_norm: false,
                tie_word_embeddings: true,
                pad_token_id: 1,
                bos_token_id: 2,
                eos_token_id: 2,
            }),
        }
    }
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    format!("{:x}", hasher.finalize())
}

/// Writes `bytes` to `path` atomically (the run-folder contract's writer), creating its folder.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(superficial_run_folder::write_atomic(path, bytes)?)
}

fn jsonl<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The files of a generated world.
pub struct WorldFiles {
    pub dir: PathBuf,
    pub train_gt: PathBuf,
    pub train_w2s: PathBuf,
    pub test: PathBuf,
    pub helpful: PathBuf,
    pub tokenizer_dir: PathBuf,
    /// Hash of every file above: the world's identity for the model cache.
    pub hash: String,
    pub tokenizer: TextTokenizer,
}

/// Generates the world and writes it (facts, corpus, splits, tokenizer) under `dir`.
pub fn write_world(config: &ExperimentConfig, dir: &Path) -> Result<(World, WorldFiles)> {
    let world = World::generate(&config.world).map_err(anyhow::Error::msg)?;
    let files = WorldFiles {
        dir: dir.to_path_buf(),
        train_gt: dir.join("harmless_train_gt.jsonl"),
        train_w2s: dir.join("harmless_train_w2s.jsonl"),
        test: dir.join("harmless_test.jsonl"),
        helpful: dir.join("helpful_train.jsonl"),
        tokenizer_dir: dir.join("tokenizer"),
        hash: String::new(),
        tokenizer: TextTokenizer::bytes()?,
    };
    let entities = jsonl(&world.entities)?;
    let corpus: Vec<_> = world.corpus.iter().map(|t| json!({ "text": t })).collect();
    let corpus = jsonl(&corpus)?;
    let splits: Vec<(&Path, Vec<u8>)> = vec![
        (&files.train_gt, jsonl(&world.train_gt)?),
        (&files.train_w2s, jsonl(&world.train_w2s)?),
        (&files.test, jsonl(&world.test)?),
        (&files.helpful, jsonl(&world.helpful)?),
    ];
    write_file(&dir.join("entities.jsonl"), &entities)?;
    write_file(&dir.join("corpus.jsonl"), &corpus)?;
    for (path, bytes) in &splits {
        write_file(path, bytes)?;
    }
    write_file(
        &dir.join("world_config.json"),
        serde_json::to_string_pretty(&config.world)?.as_bytes(),
    )?;
    let tokenizer = TextTokenizer::train_byte_level_bpe(
        world.tokenizer_texts(),
        config.tokenizer_vocab,
        SPECIAL_TOKENS,
    )
    .context("training the sandbox tokenizer")?;
    tokenizer
        .save(&files.tokenizer_dir)
        .context("saving the sandbox tokenizer")?;
    let tokenizer_json = std::fs::read(files.tokenizer_dir.join("tokenizer.json"))?;
    let mut parts: Vec<&[u8]> = vec![&entities, &corpus, &tokenizer_json];
    parts.extend(splits.iter().map(|(_, b)| b.as_slice()));
    let hash = sha256_hex(&parts);
    Ok((
        world,
        WorldFiles {
            hash,
            tokenizer,
            ..files
        },
    ))
}

/// A pretrained model in the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainedModel {
    pub name: String,
    pub family: Family,
    pub dir: PathBuf,
    pub parameters: usize,
    pub final_loss: f64,
    pub seconds: f64,
    /// Loaded from the cache instead of trained in this run.
    #[serde(default)]
    pub cached: bool,
}

const PRETRAINED_MARKER: &str = "pretraining.json";

/// A model of one pretraining draw that is not in the cache yet.
struct PretrainTask<'a> {
    /// (draw, position among the draw's models).
    index: (usize, usize),
    config: &'a ExperimentConfig,
    family: Family,
    size: &'a SizeSpec,
    model_config: ModelConfig,
    dir: PathBuf,
}

/// Per draw, per size: the cached model, or `None` with a task to pretrain it.
type CacheLookup<'a> = (Vec<Vec<Option<PretrainedModel>>>, Vec<PretrainTask<'a>>);

/// Looks every model of every draw up in the cache (keyed by the world, the model's
/// configuration, the pretraining settings and what the size reads).
fn look_up_cached<'a>(
    draws: &'a [ExperimentConfig],
    files: &WorldFiles,
    world: &World,
    cache: &Path,
    progress: &mut dyn Progress,
) -> Result<CacheLookup<'a>> {
    let vocab = files.tokenizer.vocab_size();
    let mut out = Vec::new();
    let mut todo = Vec::new();
    for (draw, config) in draws.iter().enumerate() {
        let mut families = vec![config.family];
        if config.pretrain_both_families {
            families = vec![Family::Gpt2, Family::Opt];
        }
        let mut found = Vec::new();
        for family in families {
            for size in config.family_sizes(family) {
                let model_config = config.model_config(family, size, vocab);
                let key = sha256_hex(&[
                    files.hash.as_bytes(),
                    serde_json::to_string(&model_config.to_hf_json())?.as_bytes(),
                    serde_json::to_string(&config.pretrain)?.as_bytes(),
                    size.entities_read(world.mentioned_entities())
                        .to_string()
                        .as_bytes(),
                ]);
                let dir = cache.join(format!("{}-{}", size.name, &key[..12]));
                let marker = dir.join(PRETRAINED_MARKER);
                if let Ok(text) = std::fs::read_to_string(&marker)
                    && let Ok(mut model) = serde_json::from_str::<PretrainedModel>(&text)
                {
                    progress.line(&format!(
                        "pretrained {} of draw pretrain.seed={} found in the cache ({})",
                        size.name,
                        config.pretrain.seed,
                        dir.display()
                    ));
                    model.dir = dir;
                    model.cached = true;
                    found.push(Some(model));
                    continue;
                }
                todo.push(PretrainTask {
                    index: (draw, found.len()),
                    config,
                    family,
                    size,
                    model_config,
                    dir,
                });
                found.push(None);
            }
        }
        out.push(found);
    }
    Ok((out, todo))
}

/// One server's share of pretraining: its client, its progress lines, each corpus cut (by the
/// number of entities read) once uploaded there.
struct Pretrainer<'p, 'q> {
    client: W2sClient,
    progress: crate::study::pool::ServerProgress<'p, 'q>,
    corpus_datasets: BTreeMap<usize, String>,
}

impl Pretrainer<'_, '_> {
    /// The dataset id of the corpus that reads the `read` most frequent entities, uploaded to
    /// this server on first use.
    async fn corpus_dataset(&mut self, world: &World, read: usize) -> Result<String> {
        if let Some(id) = self.corpus_datasets.get(&read) {
            return Ok(id.clone());
        }
        let corpus: Vec<Item> = world
            .corpus_reading(read)
            .into_iter()
            .map(|text| Item::Text(pb::TextRow { text }))
            .collect();
        let info = self
            .client
            .upload_dataset(&format!("sandbox-corpus-reads-{read}"), corpus)
            .await
            .with_context(|| {
                format!("uploading the pretraining corpus of the {read} most frequent entities")
            })?;
        self.corpus_datasets.insert(read, info.id.clone());
        Ok(info.id)
    }
}

/// Pretrains (or finds in the cache) every model of the configured families, for each
/// pretraining draw in `draws` (one configuration per draw, as `ExperimentConfig::for_draw`
/// makes them). The sizes left to pretrain, of all draws, are spread over the servers in one
/// pool (one at a time per server, the corpus uploaded once per server); a server that fails
/// leaves the pool and its size goes to another. Returns the models per draw, in `draws` order.
pub async fn pretrain_models(
    draws: &[ExperimentConfig],
    files: &WorldFiles,
    world: &World,
    servers: &[W2sClient],
    cache: &Path,
    progress: &mut dyn Progress,
) -> Result<Vec<Vec<PretrainedModel>>> {
    use crate::study::pool::{ServerProgress, spread};
    use std::cell::RefCell;
    let (mut out, todo) = look_up_cached(draws, files, world, cache, progress)?;
    let collect = |out: Vec<Vec<Option<PretrainedModel>>>| -> Vec<Vec<PretrainedModel>> {
        out.into_iter()
            .map(|draw| draw.into_iter().flatten().collect())
            .collect()
    };
    if todo.is_empty() {
        return Ok(collect(out));
    }
    let several = servers.len() > 1;
    let shared: RefCell<&mut dyn Progress> = RefCell::new(progress);
    let mentioned = world.mentioned_entities();
    let mut workers: Vec<Pretrainer> = servers
        .iter()
        .enumerate()
        .map(|(i, client)| Pretrainer {
            client: client.clone(),
            progress: ServerProgress {
                shared: &shared,
                prefix: if several {
                    format!("[server {i}] ")
                } else {
                    String::new()
                },
            },
            corpus_datasets: BTreeMap::new(),
        })
        .collect();
    let alive: Vec<std::cell::Cell<bool>> =
        servers.iter().map(|_| std::cell::Cell::new(true)).collect();
    let indices: Vec<(usize, usize)> = todo.iter().map(|task| task.index).collect();
    let models = spread(
        &mut workers,
        &alive,
        todo,
        async |worker: &mut Pretrainer, task: &PretrainTask| {
            let dataset = worker
                .corpus_dataset(world, task.size.entities_read(mentioned))
                .await?;
            let model = pretrain_one(
                task,
                &files.tokenizer,
                &dataset,
                &worker.client,
                &mut worker.progress,
            )
            .await?;
            write_file(
                &task.dir.join(PRETRAINED_MARKER),
                serde_json::to_string_pretty(&model)?.as_bytes(),
            )?;
            Ok(model)
        },
        |worker: &mut Pretrainer, server, e| {
            worker.progress.line(&format!(
                "server {server} failed ({e:#}); it leaves the pool and its pretraining goes to another server"
            ))
        },
    )
    .await?;
    for ((draw, index), model) in indices.into_iter().zip(models) {
        out[draw][index] = Some(model);
    }
    Ok(collect(out))
}

/// Initialises one model on the server, pretrains it on `dataset` and downloads it into its
/// cache folder.
async fn pretrain_one(
    task: &PretrainTask<'_>,
    tokenizer: &TextTokenizer,
    dataset: &str,
    client: &W2sClient,
    progress: &mut dyn Progress,
) -> Result<PretrainedModel> {
    let PretrainTask {
        config,
        family,
        size,
        model_config,
        dir,
        ..
    } = task;
    let started = Instant::now();
    let parameters = parameter_count(model_config);
    progress.line(&format!(
        "pretraining {} of draw pretrain.seed={} ({} parameters, {} layers x {} wide)",
        size.name, config.pretrain.seed, parameters, size.layers, size.width
    ));
    // The server makes the random initialisation itself from the config and the seed (the
    // same weights `CausalLm::random_init` gives here): nothing travels but two JSON texts.
    let seed = config.pretrain.seed ^ sha256_seed(&size.name);
    let base = format!("sandbox-init-{}", size.name);
    let output = format!("sandbox-pretrained-{}", size.name);
    for name in [&base, &output] {
        unload(client, name).await;
    }
    client
        .load_model(pb::LoadModelRequest {
            name: base.clone(),
            source: Some(pb::load_model_request::Source::RandomInit(pb::RandomInit {
                config_json: model_config.to_hf_json().to_string(),
                tokenizer_json: tokenizer.to_json_string()?,
            })),
            role: "pretraining".into(),
            seed,
            ..Default::default()
        })
        .await
        .with_context(|| format!("initialising {} on the server", size.name))?;
    let request = pretraining_request(config, &base, dataset, &output);
    let stage = format!("pretrain {}", size.name);
    let mut last_loss = f64::NAN;
    let mut last_print = Instant::now();
    let ended = client
        .run_job(request, |event| {
            if let Some(step) = &event.step {
                progress.step(&stage, step.step, step.total_steps);
                last_loss = step.loss;
                if last_print.elapsed().as_secs_f64() > 5.0 || step.step == step.total_steps {
                    last_print = Instant::now();
                    progress.line(&format!(
                        "    {stage}: step {}/{} loss {:.3}",
                        step.step, step.total_steps, step.loss
                    ));
                }
            }
        })
        .await
        .with_context(|| format!("pretraining {}", size.name))?;
    if ended.state != pb::JobState::Succeeded as i32 {
        bail!("pretraining {} failed: {}", size.name, ended.error);
    }
    if let Some(metrics) = &ended.final_metrics {
        last_loss = metrics.loss;
    }
    download_to_cache(client, &output, dir)
        .await
        .with_context(|| format!("downloading the pretrained {}", size.name))?;
    for name in [base, output] {
        unload(client, &name).await;
    }
    // The cache holds the model now; the job's copy on the server is no longer needed.
    if let Err(e) = client.delete_job_if_present(&ended.id).await {
        progress.line(&format!(
            "    could not delete pretraining job {} on the server: {e}",
            ended.id
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.line(&format!(
        "pretrained {} of draw pretrain.seed={} in {seconds:.0} s, final loss {last_loss:.3}",
        size.name, config.pretrain.seed
    ));
    Ok(PretrainedModel {
        name: size.name.clone(),
        family: *family,
        dir: dir.to_path_buf(),
        parameters,
        final_loss: last_loss,
        seconds,
        cached: false,
    })
}

/// The CAUSAL_LM job that pretrains `base` into `output` on the corpus `dataset`.
fn pretraining_request(
    config: &ExperimentConfig,
    base: &str,
    dataset: &str,
    output: &str,
) -> pb::StartJobRequest {
    pb::StartJobRequest {
        objective: pb::ObjectiveKind::CausalLm as i32,
        base_model: base.to_string(),
        dataset_ids: vec![dataset.to_string()],
        hyperparameters: Some(pb::TrainingHyperparameters {
            lr: config.pretrain.lr,
            batch_size: config.pretrain.batch_size,
            minibatch_size: config.pretrain.batch_size,
            shards: config.pretrain.shards,
            epochs: config.pretrain.epochs,
            schedule: pb::LrSchedule::CosineToZero as i32,
            warmup_frac: Some(0.05),
            max_ctx: config.pretrain.max_ctx,
            seed: config.pretrain.seed,
            shuffle: true,
            ..Default::default()
        }),
        output_model: output.to_string(),
    }
}

/// Downloads the server's model `name` into the cache folder `dir`. Downloads go into a new
/// folder; a leftover from an interrupted run of this cache entry (no marker yet) is ours to
/// clear.
async fn download_to_cache(client: &W2sClient, name: &str, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    if dir.is_dir() && !dir.join(PRETRAINED_MARKER).is_file() {
        std::fs::remove_dir_all(dir)?;
    }
    client.download_model(name, dir).await?;
    Ok(())
}

/// Loads the HF folder `dir` (on this machine) on the server under `name`: uploaded, or by its
/// digest when the server already holds it.
async fn load_folder(client: &W2sClient, name: &str, dir: &Path, role: &str) -> Result<()> {
    client
        .upload_model(
            pb::LoadModelRequest {
                name: name.to_string(),
                role: role.into(),
                ..Default::default()
            },
            dir,
        )
        .await?;
    Ok(())
}

/// Drops a model from the server; best effort (it may not be there).
async fn unload(client: &W2sClient, name: &str) {
    let _ = client.unload_if_present(name).await;
}

fn sha256_seed(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]))
}

/// Mention-count buckets for the knowledge tables: unseen, rare, common, frequent.
pub fn mention_bucket(mentions: usize) -> &'static str {
    match mentions {
        0 => "0 (unseen)",
        1..=3 => "1-3",
        4..=15 => "4-15",
        _ => "16+",
    }
}

pub const BUCKETS: [&str; 4] = ["0 (unseen)", "1-3", "4-15", "16+"];

/// Zero-shot knowledge of a pretrained model: does it give the correct response a higher mean
/// log-prob than the wrong one, before any fine-tuning?
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub name: String,
    pub family: Family,
    pub parameters: usize,
    /// Zero-shot accuracy on the harmless test pairs (mean response log-prob).
    pub accuracy: f64,
    /// The same by summed response log-prob: where a reward model with the
    /// `last_token_and_mean_logprob` read-out starts (its head aside).
    pub accuracy_summed: f64,
    /// The same per mention bucket: (accuracy, pairs).
    pub by_bucket: BTreeMap<String, (f64, usize)>,
    /// Share of all facts the model states correctly ("The X berry is" → true adjective more
    /// likely than the false one), per mention bucket: (share, entities).
    pub facts_by_bucket: BTreeMap<String, (f64, usize)>,
    /// Per entity (world order): mean log-prob of the true minus the false adjective.
    pub fact_margins: Vec<f64>,
}

fn bucket_shares(items: impl Iterator<Item = (usize, bool)>) -> BTreeMap<String, (f64, usize)> {
    let mut out: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (mentions, right) in items {
        let entry = out.entry(mention_bucket(mentions).to_string()).or_default();
        entry.0 += right as usize as f64;
        entry.1 += 1;
    }
    for (sum, n) in out.values_mut() {
        *sum /= *n as f64;
    }
    out
}

async fn logprob_margins(
    client: &W2sClient,
    model: &str,
    pairs: &[pb::PreferencePair],
    scoring: pb::PairScoring,
    max_ctx: u32,
) -> Result<Vec<f64>> {
    client
        .pair_margins(model, pairs, scoring, max_ctx, 64)
        .await
        .with_context(|| format!("probing {model}"))
}

pub async fn probe(
    model: &PretrainedModel,
    world: &World,
    client: &W2sClient,
    max_ctx: u32,
) -> Result<Probe> {
    let name = format!("sandbox-probe-{}", model.name);
    unload(client, &name).await;
    load_folder(client, &name, &model.dir, "probe")
        .await
        .with_context(|| format!("loading {}", model.dir.display()))?;
    let test = &world.test;
    let pairs: Vec<pb::PreferencePair> = test
        .iter()
        .map(|row| {
            let (prompt, chosen) =
                superficial_models::tokenizer::split_dialogue(&row.chosen).unwrap_or(("", ""));
            let rejected = superficial_models::tokenizer::split_dialogue(&row.rejected)
                .map(|(_, r)| r)
                .unwrap_or("");
            pb::PreferencePair {
                prompt: prompt.to_string(),
                chosen: chosen.to_string(),
                rejected: rejected.to_string(),
            }
        })
        .collect();
    let margins =
        logprob_margins(client, &name, &pairs, pb::PairScoring::MeanLogprob, max_ctx).await?;
    let summed =
        logprob_margins(client, &name, &pairs, pb::PairScoring::SumLogprob, max_ctx).await?;
    let facts: Vec<pb::PreferencePair> = world
        .entities
        .iter()
        .map(|entity| {
            let (prompt, chosen, rejected) = world::fact_probe(entity, world.fact_order);
            pb::PreferencePair {
                prompt,
                chosen,
                rejected,
            }
        })
        .collect();
    let fact_margins =
        logprob_margins(client, &name, &facts, pb::PairScoring::MeanLogprob, max_ctx).await?;
    unload(client, &name).await;
    let correct = margins.iter().filter(|m| **m > 0.0).count();
    let by_bucket = bucket_shares(
        test.iter()
            .zip(&margins)
            .map(|(r, m)| (r.mentions, *m > 0.0)),
    );
    let facts_by_bucket = bucket_shares(
        world
            .entities
            .iter()
            .zip(&fact_margins)
            .map(|(e, m)| (e.mentions, *m > 0.0)),
    );
    Ok(Probe {
        name: model.name.clone(),
        family: model.family,
        parameters: model.parameters,
        accuracy: correct as f64 / test.len().max(1) as f64,
        accuracy_summed: summed.iter().filter(|m| **m > 0.0).count() as f64
            / test.len().max(1) as f64,
        by_bucket,
        facts_by_bucket,
        fact_margins,
    })
}

/// The study spec of the grid family over the world's files.
pub fn study_spec(
    config: &ExperimentConfig,
    files: &WorldFiles,
    models: &[PretrainedModel],
) -> Result<StudySpec> {
    let grid: Vec<ModelSpec> = config
        .family_sizes(config.family)
        .iter()
        .map(|size| {
            let model = models
                .iter()
                .find(|m| m.name == size.name)
                .with_context(|| format!("model {} was not pretrained", size.name))?;
            Ok(ModelSpec {
                name: size.name.clone(),
                path: Some(std::fs::canonicalize(&model.dir)?),
                preset: None,
                seed: 0,
                // The cache folder's name carries the hash of everything that made the model.
                identity: model
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string()),
            })
        })
        .collect::<Result<_>>()?;
    let bootstrap = if config.bootstrap {
        let n = grid.len();
        vec![[
            grid[0].name.clone(),
            grid[n / 2].name.clone(),
            grid[n - 1].name.clone(),
        ]]
    } else {
        Vec::new()
    };
    let w = &config.world;
    let spec = StudySpec {
        data: DataFiles {
            gt: files.train_gt.clone(),
            w2s: files.train_w2s.clone(),
            test: files.test.clone(),
            helpful: Some(files.helpful.clone()),
        },
        sizes: Sizes {
            n_docs: w.train_gt_pairs,
            n_w2s_docs: w.train_w2s_pairs,
            n_test_docs: w.test_pairs,
            n_extra_docs: w.helpful_pairs,
        },
        models: grid,
        scenarios: config.scenarios.clone(),
        settings: config.settings.clone(),
        seeds: config.seeds.clone(),
        high_conf: false,
        bootstrap,
        reward: config.reward.clone(),
        preference: config.preference.clone(),
        conflict: config.conflict.clone(),
        on_policy: config.on_policy.clone(),
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

impl ExperimentConfig {
    /// Applies `KEY=VALUE` overrides in TOML syntax (e.g. `world.entities=400`).
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self, SpecError> {
        if overrides.is_empty() {
            return Ok(self);
        }
        let mut table = toml::Table::try_from(&self).map_err(|e| e.to_string())?;
        for item in overrides {
            crate::spec::apply_override(&mut table, item)?;
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e| SpecError(format!("experiment overrides: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_get_their_own_pretraining_draw_unless_switched_off() {
        let mut config = ExperimentConfig {
            seeds: vec![0, 2],
            ..ExperimentConfig::default()
        };
        config.pretrain.seed = 10;
        let draws = config.pretraining_draws();
        assert_eq!(
            draws,
            vec![
                PretrainingDraw {
                    pretrain_seed: 10,
                    study_seeds: vec![0]
                },
                PretrainingDraw {
                    pretrain_seed: 12,
                    study_seeds: vec![2]
                },
            ]
        );
        let second = config.for_draw(&draws[1]);
        assert_eq!((second.pretrain.seed, second.seeds.clone()), (12, vec![2]));
        config.pretrain_per_seed = false;
        assert_eq!(
            config.pretraining_draws(),
            vec![PretrainingDraw {
                pretrain_seed: 10,
                study_seeds: vec![0, 2]
            }]
        );
        config.seeds = vec![1, 1];
        assert!(config.validate().unwrap_err().0.contains("repeat"));
    }
}
