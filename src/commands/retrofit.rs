//! The commands that adapt a model and check the result: train, verify, ablate.

use super::RuleArgs;
use crate::assets::text_path;
use crate::model_args::ModelArgs;
use crate::scan::Rule;
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Recipe YAML [default with --resume: the checkpoint's own resolved recipe]
    pub recipe: Option<PathBuf>,
    /// Overrides `key.sub=value`, e.g. `optim.lr=3e-4 adapters.lora.rank=8`
    pub overrides: Vec<String>,
    /// Continue a run from its newest checkpoint (a run folder or one checkpoint folder)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Data parallel over these devices (`cpu*2`, `cuda:0,cuda:1`, `cuda*4`): sets
    /// train.devices; data.batch_size is per device
    #[arg(long, value_name = "LIST")]
    pub devices: Option<String>,
}

pub fn train_cmd(args: &TrainArgs) -> Result<()> {
    let recipe_path = match (&args.recipe, &args.resume) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => crate::resume::latest_checkpoint(dir)?.join("recipe.yaml"),
        (None, None) => {
            return Err(Error::Usage(
                "train needs a RECIPE (or --resume DIR)".into(),
            ))
        }
    };
    let mut overrides = args.overrides.clone();
    if let Some(d) = &args.devices {
        overrides.push(format!("train.devices={d}"));
    }
    let recipe = crate::recipe::load(&recipe_path, &overrides)?;
    let (dir, s) = crate::train::train(&recipe, args.resume.as_deref())?;
    use crate::train::one_line;
    println!("base     {}", one_line(&s.base));
    println!("step 0   {}", one_line(&s.step0));
    println!("last     {}", one_line(&s.last));
    println!("best     {} (step {})", one_line(&s.best), s.best.step);
    println!(
        "birth layers {:?}, massive dims {:?}; {:.0} tokens/s, {:.1} s",
        s.birth_layers, s.massive_dims, s.tokens_per_s, s.wall_s
    );
    println!(
        "run folder {} (best/ final/ checkpoints/ summary.json)",
        dir.display()
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Recipe of the run to verify (its best adapters, eval text, rule and `verify:` limits)
    pub recipe: Option<PathBuf>,
    /// Recipe overrides `key.sub=value`
    pub overrides: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter folder [default with a recipe: <train.out_dir>/best]
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Text to verify on; repeat for several, each checked on its own [default: the recipe's
    /// verify.text, else its data.eval, else the fetched Hamlet]
    #[arg(long)]
    pub text: Vec<PathBuf>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub num_seqs: Option<usize>,
    /// Also verify at this window length (with --long-num-seqs windows of each text)
    #[arg(long)]
    pub long_seq_len: Option<usize>,
    /// Windows of each text at --long-seq-len [default: the recipe's verify.long.windows, else 2]
    #[arg(long)]
    pub long_num_seqs: Option<usize>,
    #[arg(long)]
    pub abs: Option<f64>,
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Most massive entries allowed after adaptation
    #[arg(long)]
    pub max_massive: Option<usize>,
    /// Largest relative perplexity increase allowed (0.01 = +1%)
    #[arg(long)]
    pub max_ppl_increase: Option<f64>,
    /// Where verify.json, verify.md and the overlay plot go [default: <run>/verify or <adapter>/verify]
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn verify_cmd(args: &VerifyArgs) -> Result<()> {
    use crate::verify::{failure, verify, VerifyPlan};
    let recipe = match &args.recipe {
        Some(p) => Some(crate::recipe::load(p, &args.overrides)?),
        None => None,
    };
    // The recipe (or, without one, the defaults of a plain scan) first; flags given win.
    let mut plan = match &recipe {
        Some(r) => VerifyPlan::from_recipe(r),
        None => {
            let adapter = args
                .adapter
                .clone()
                .ok_or_else(|| Error::Usage("verify needs a RECIPE or --adapter DIR".into()))?;
            VerifyPlan {
                model: args.model.model_spec()?,
                device: args.model.device.clone(),
                device_map: None,
                dtype: None,
                texts: vec![text_path(&None)?],
                seq_len: 512,
                num_seqs: 10,
                long: None,
                rule: Rule::default(),
                max_massive: 0,
                max_ppl_increase: 0.01,
                quant: None,
                stream: None,
                out: adapter.join("verify"),
                adapter,
            }
        }
    };
    if let Some(m) = &args.model.model {
        plan.model = m.clone();
    }
    if args.model.device != "cpu" {
        plan.device = args.model.device.clone();
    }
    if let Some(m) = &args.model.device_map {
        plan.device_map = Some(m.clone());
    }
    if let Some(d) = &args.model.dtype {
        plan.dtype = Some(d.clone());
    }
    if let Some(a) = &args.adapter {
        plan.adapter = a.clone();
    }
    if !args.text.is_empty() {
        plan.texts = args.text.clone();
    }
    plan.seq_len = args.seq_len.unwrap_or(plan.seq_len);
    plan.num_seqs = args.num_seqs.unwrap_or(plan.num_seqs);
    if let Some(n) = args.long_seq_len {
        plan.long = Some((n, plan.long.map_or(2, |l| l.1)));
    }
    if let (Some(k), Some(long)) = (args.long_num_seqs, plan.long.as_mut()) {
        long.1 = k;
    } else if args.long_num_seqs.is_some() {
        return Err(Error::Usage(
            "--long-num-seqs needs --long-seq-len (or a recipe with verify.long)".into(),
        ));
    }
    plan.rule = RuleArgs {
        abs: args.abs.unwrap_or(plan.rule.abs),
        ratio: args.ratio.unwrap_or(plan.rule.ratio),
    }
    .rule()?;
    plan.max_massive = args.max_massive.unwrap_or(plan.max_massive);
    plan.max_ppl_increase = args.max_ppl_increase.unwrap_or(plan.max_ppl_increase);
    if let Some(o) = &args.out {
        plan.out = o.clone();
    }
    if plan.seq_len == 0 || plan.num_seqs == 0 || plan.long.is_some_and(|l| l.0 == 0 || l.1 == 0) {
        return Err(Error::Usage(
            "--seq-len, --num-seqs, --long-seq-len and --long-num-seqs must be at least 1".into(),
        ));
    }
    let reports = verify(&plan)?;
    if reports.iter().any(|r| !r.pass) {
        return Err(failure(&reports));
    }
    println!("verify passed ({})", plan.out.display());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct AblateArgs {
    /// Recipe with an `ablate:` section (grid and/or points)
    pub recipe: PathBuf,
    /// Overrides `key.sub=value` applied before the grid
    pub overrides: Vec<String>,
    /// Skip points that finished in an earlier run of this grid
    #[arg(long)]
    pub resume: bool,
    /// List the points and exit
    #[arg(long)]
    pub dry_run: bool,
}

pub fn ablate_cmd(args: &AblateArgs) -> Result<()> {
    let recipe = crate::recipe::load(&args.recipe, &args.overrides)?;
    let origin = args.recipe.display().to_string();
    if args.dry_run {
        let pts = crate::ablate::points(&recipe);
        for (i, p) in pts.iter().enumerate() {
            println!(
                "{:>3}  {}  -> {}",
                i + 1,
                p.name,
                recipe.train.out_dir.join(&p.name).display()
            );
        }
        println!(
            "{} points; TensorBoard: {}",
            pts.len(),
            recipe.log.dir.display()
        );
        return Ok(());
    }
    let (out, rows) = crate::ablate::ablate(&recipe, &origin, args.resume)?;
    print!("{}", crate::ablate::markdown(&rows));
    println!(
        "table: {} (.md, .csv); TensorBoard: tensorboard --logdir {}",
        out.join("ablate").display(),
        recipe.log.dir.display()
    );
    Ok(())
}
