use super::*;

const MINIMAL: &str = "model:\n  path: m.gguf\ndata:\n  train: t.txt\n  eval: e.txt\n";

fn parse(text: &str, overrides: &[&str]) -> crate::Result<Recipe> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse_str(text, "recipes/x.yaml", &overrides)
}

/// The usage message for a recipe that must fail.
fn fails(text: &str, overrides: &[&str]) -> String {
    match parse(text, overrides) {
        Err(Error::Usage(msg)) => msg,
        other => panic!("expected a usage error, got {other:?}"),
    }
}

#[test]
fn minimal_recipe_takes_every_default() {
    assert_eq!(
        parse(MINIMAL, &[]).unwrap(),
        Recipe::new("m.gguf", "t.txt", "e.txt")
    );
}

#[test]
fn default_round_trips_through_yaml() {
    let recipe = Recipe::new("m.gguf", "t.txt", "e.txt");
    let yaml = recipe.to_yaml();
    assert_eq!(parse(&yaml, &[]).unwrap(), recipe);
    let sections: Vec<&str> = yaml.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(
        sections,
        [
            "model:",
            "data:",
            "adapters:",
            "loss:",
            "optim:",
            "train:",
            "eval:",
            "log:",
            "verify:",
            "export:",
            "ablate:"
        ]
    );
}

#[test]
fn stream_check_and_training_window_are_typed() {
    let r = parse(
        &format!("{MINIMAL}adapters:\n  eab:\n    window: 64\nverify:\n  stream:\n    max_ppl_increase: 0.02\n    cache: 1024\n"),
        &["verify.stream.tokens=4096"],
    )
    .unwrap();
    assert_eq!(r.adapters.eab.window, Some(64));
    let st = &r.verify.stream;
    assert_eq!(
        (st.max_ppl_increase, st.cache, st.sink_tokens, st.tokens),
        (Some(0.02), 1024, 0, 4096)
    );
    assert_eq!(
        parse(MINIMAL, &[]).unwrap().verify.stream.max_ppl_increase,
        None
    );
    for (over, needle) in [
        ("verify.stream.cache=0", "verify.stream.cache must be >= 1"),
        (
            "verify.stream.sink_tokens=256",
            "verify.stream.sink_tokens must be below verify.stream.cache (256)",
        ),
        (
            "verify.stream.tokens=256",
            "verify.stream.tokens must be above verify.stream.cache (256)",
        ),
        (
            "verify.stream.max_ppl_increase=-1",
            "verify.stream.max_ppl_increase must be >= 0",
        ),
        (
            "adapters.eab.window=128",
            "adapters.eab.window must be below data.seq_len (128)",
        ),
        ("adapters.eab.window=0", "adapters.eab.window must be >= 1"),
    ] {
        let msg = fails(MINIMAL, &[over]);
        assert!(msg.contains(needle), "{over}: {msg}");
    }
    let msg = fails(
        MINIMAL,
        &[
            "adapters.eab.enabled=false",
            "adapters.eab.mask_first_token=false",
            "adapters.eab.window=8",
        ],
    );
    assert!(
        msg.contains("adapters.eab.window needs adapters.eab.enabled"),
        "{msg}"
    );
}

#[test]
fn verify_quant_check_is_typed() {
    let r = parse(
        &format!("{MINIMAL}verify:\n  quant:\n    max_gap: 0.25\n    a: 6\n    act_scale: token\n"),
        &["verify.seq_len=256"],
    )
    .unwrap();
    let q = &r.verify.quant;
    assert_eq!((q.max_gap, q.w, q.a, q.kv), (Some(0.25), 8, 6, 16));
    assert_eq!(q.act_scale, crate::quant::ActScale::Token);
    assert_eq!((r.verify.seq_len, r.verify.windows), (256, 10));
    let msg = fails(
        &format!("{MINIMAL}verify:\n  quant:\n    max_gapp: 0.1\n"),
        &[],
    );
    assert!(
        msg.contains("unknown field `max_gapp`; did you mean `max_gap`?"),
        "{msg}"
    );
    let msg = fails(&format!("{MINIMAL}verify:\n  quant:\n    a: 1\n"), &[]);
    assert!(msg.contains("verify.quant.a must be in 2..=16"), "{msg}");
    let msg = fails(
        &format!("{MINIMAL}verify:\n  quant:\n    act_scale: row\n"),
        &[],
    );
    assert!(msg.contains("act_scale"), "{msg}");
    let msg = fails(MINIMAL, &["verify.quant.max_gap=-1"]);
    assert!(msg.contains("verify.quant.max_gap must be >= 0"), "{msg}");
}

#[test]
fn non_default_values_round_trip() {
    let mut recipe = Recipe::new("org/model", "train/", "e.txt");
    recipe.model.dtype = Some(Dtype::Bf16);
    recipe.data.max_train_windows = Some(64);
    recipe.adapters.lora.rank = 8;
    recipe.adapters.lora.targets = vec![LoraTarget::Q, LoraTarget::Gate];
    recipe.adapters.lora.layers = LoraLayers::List(vec![1, 3]);
    recipe.loss.ma.ratio = Some(50.0);
    recipe.loss.ma.target = MaTarget::Ratio;
    recipe.optim.lr = 3e-4;
    recipe.log.name = Some("sweep".into());
    recipe.ablate.grid.insert(
        "optim.lr".into(),
        vec![Value::from(1e-3), Value::from(1e-4)],
    );
    let yaml = recipe.to_yaml();
    assert!(yaml.contains("  layers:\n    - 1\n    - 3\n"), "{yaml}");
    assert_eq!(parse(&yaml, &[]).unwrap(), recipe);
}

#[test]
fn unknown_key_names_file_line_path_and_near_miss() {
    let text = format!("{MINIMAL}adapters:\n  lora:\n    rnak: 8\n");
    assert_eq!(
        fails(&text, &[]),
        "recipes/x.yaml:8:5: adapters.lora: unknown field `rnak`; did you mean `rank`?"
    );
}

#[test]
fn unknown_key_without_near_miss_lists_the_fields() {
    let msg = fails(&format!("{MINIMAL}optim:\n  zzzzzz: 1\n"), &[]);
    assert!(
        msg.starts_with("recipes/x.yaml:7:3: optim: unknown field `zzzzzz`, expected one of `lr`"),
        "{msg}"
    );
}

#[test]
fn unknown_section_is_found_at_top_level() {
    let msg = fails(&format!("{MINIMAL}optm:\n  lr: 1\n"), &[]);
    assert!(
        msg.starts_with("recipes/x.yaml:6:1: unknown field `optm`; did you mean `optim`?"),
        "{msg}"
    );
}

#[test]
fn wrong_type_names_path_and_line() {
    let msg = fails(
        &format!("{MINIMAL}optim:\n  warmup_steps: 3\n  lr: fast\n"),
        &[],
    );
    assert_eq!(
        msg,
        "recipes/x.yaml:8:3: optim.lr: invalid type: string \"fast\", expected f64"
    );
}

#[test]
fn unknown_enum_word_suggests_the_variant() {
    let msg = fails(&format!("{MINIMAL}loss:\n  hold:\n    kind: kll\n"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:8:5: loss.hold.kind: unknown variant `kll`; did you mean `kl`?"
    );
    let msg = fails(
        &format!("{MINIMAL}adapters:\n  lora:\n    targets: [down, upp]\n"),
        &[],
    );
    assert_eq!(
        msg,
        "recipes/x.yaml:8:5: adapters.lora.targets[1]: unknown variant `upp`; did you mean `up`?"
    );
}

#[test]
fn layer_selectors_accept_their_words_and_lists_only() {
    let msg = fails(
        &format!("{MINIMAL}adapters:\n  lora:\n    layers: brith\n"),
        &[],
    );
    assert_eq!(
        msg,
        "recipes/x.yaml:8:5: adapters.lora.layers: unknown variant `brith`; did you mean `birth`?"
    );
    let msg = fails(&format!("{MINIMAL}loss:\n  ma:\n    layers: birth\n"), &[]);
    assert!(
        msg.contains("loss.ma.layers: unknown variant `birth`, expected `all`"),
        "{msg}"
    );
    let msg = fails(
        &format!("{MINIMAL}loss:\n  ma:\n    layers: {{a: 1}}\n"),
        &[],
    );
    assert!(
        msg.ends_with("loss.ma.layers: expected a layer keyword or a list of layer indices"),
        "{msg}"
    );
    let recipe = parse(&format!("{MINIMAL}loss:\n  ma:\n    layers: [0, 2]\n"), &[]).unwrap();
    assert_eq!(recipe.loss.ma.layers, MaLayers::List(vec![0, 2]));
}

#[test]
fn missing_required_fields_are_named() {
    let msg = fails("model:\n  device: cpu\ndata:\n  train: t\n  eval: e\n", &[]);
    assert_eq!(msg, "recipes/x.yaml:1:1: model: missing field `path`");
    assert_eq!(fails("", &[]), "recipes/x.yaml: missing field `model`");
}

#[test]
fn yaml_syntax_error_has_a_location() {
    let msg = fails("model:\n  path: [m\ndata: {}\n", &[]);
    assert!(
        msg.starts_with("recipes/x.yaml:3:5: did not find expected ',' or ']', while"),
        "{msg}"
    );
}

#[test]
fn validation_errors_start_with_the_field_and_point_at_its_line() {
    let msg = fails(&format!("{MINIMAL}optim:\n  lr: -1\n"), &[]);
    assert_eq!(msg, "recipes/x.yaml:7:3: optim.lr must be > 0, got -1");
    let msg = fails(&format!("{MINIMAL}optim:\n  betas: [0.9, 1.0]\n"), &[]);
    assert_eq!(
        msg,
        "recipes/x.yaml:7:3: optim.betas[1] must be in [0, 1), got 1"
    );
    let msg = fails(&format!("{MINIMAL}model2: 1\n"), &[]);
    assert!(msg.contains("did you mean `model`?"), "{msg}");
}

#[test]
fn cross_field_rules() {
    let msg = fails(
        &format!("{MINIMAL}adapters:\n  eab:\n    enabled: false\n"),
        &[],
    );
    assert!(
        msg.starts_with("recipes/x.yaml:7:3: adapters.eab.mask_first_token must be false"),
        "{msg}"
    );
    parse(
        &format!("{MINIMAL}adapters:\n  eab:\n    enabled: false\n    mask_first_token: false\n"),
        &[],
    )
    .unwrap();

    let msg = fails(
        &format!("{MINIMAL}adapters:\n  lora:\n    rank: 4\n    targets: []\n"),
        &[],
    );
    assert_eq!(msg, "recipes/x.yaml:9:5: adapters.lora.targets must be non-empty when adapters.lora.rank > 0, got []");
    parse(
        &format!("{MINIMAL}adapters:\n  lora:\n    targets: []\n"),
        &[],
    )
    .unwrap();

    let msg = fails(&format!("{MINIMAL}loss:\n  ma:\n    target: ratio\n"), &[]);
    assert!(
        msg.contains("loss.ma.ratio must be set when loss.ma.target is `ratio`"),
        "{msg}"
    );

    let msg = fails(&format!("{MINIMAL}model:\n  path: m\n  device: gpu\n"), &[]);
    assert!(msg.contains("duplicate"), "{msg}");
    let msg = fails(
        "model:\n  path: m\n  device: gpu\ndata:\n  train: t\n  eval: e\n",
        &[],
    );
    assert_eq!(
        msg,
        "recipes/x.yaml:3:3: model.device must be `cpu`, `cuda` or `cuda:N`, got `gpu`"
    );
    parse(
        "model:\n  path: m\n  device: cuda:1\ndata:\n  train: t\n  eval: e\n",
        &[],
    )
    .unwrap();
}

#[test]
fn overrides_set_nested_scalars_lists_and_absent_sections() {
    let recipe = parse(
        MINIMAL,
        &[
            "optim.lr=3e-4",
            "adapters.lora.targets=[down,up]",
            "adapters.lora.layers=[1, 2]",
            "train.steps=7",
            "log.name=run-a",
        ],
    )
    .unwrap();
    assert_eq!(recipe.optim.lr, 3e-4);
    assert_eq!(
        recipe.adapters.lora.targets,
        [LoraTarget::Down, LoraTarget::Up]
    );
    assert_eq!(recipe.adapters.lora.layers, LoraLayers::List(vec![1, 2]));
    assert_eq!(recipe.train.steps, 7);
    assert_eq!(recipe.log.name.as_deref(), Some("run-a"));
    // The override wins over the file, and `=null` clears an optional field.
    let text = format!("{MINIMAL}optim:\n  lr: 0.5\nloss:\n  ma:\n    ratio: 2.0\n");
    let recipe = parse(&text, &["optim.lr=0.25", "loss.ma.ratio=null"]).unwrap();
    assert_eq!((recipe.optim.lr, recipe.loss.ma.ratio), (0.25, None));
}

#[test]
fn overrides_reach_inside_optional_sections() {
    let text = format!(
        "{MINIMAL}  batch_size: 1\n  long:\n    seq_len: 1024\n    windows: 2\n    every: 10\n"
    );
    let recipe = parse(&text, &["data.long.seq_len=2048", "data.long.every=15"]).unwrap();
    let long = recipe.data.long.expect("the file's section stays");
    assert_eq!((long.seq_len, long.windows, long.every), (2048, 2, 15));
    // A misspelt field inside the section is caught by the typed parse, near miss included.
    let err = fails(&text, &["data.long.seq_lne=2048"]);
    assert!(
        err.contains("seq_lne") && err.contains("did you mean `seq_len`?"),
        "{err}"
    );
}

#[test]
fn bad_overrides_are_blamed_on_the_override() {
    assert_eq!(
        fails(MINIMAL, &["adapters.lora.rnak=4"]),
        "recipes/x.yaml: override `adapters.lora.rnak=4`: unknown recipe field `adapters.lora.rnak`; did you mean `adapters.lora.rank`?"
    );
    assert_eq!(
        fails(MINIMAL, &["adapters.lora"]),
        "recipes/x.yaml: override `adapters.lora`: expected `dotted.path=value`"
    );
    // The file's `lr:` line is not the culprit, so no line number.
    let text = format!("{MINIMAL}optim:\n  lr: 0.5\n");
    assert_eq!(
        fails(&text, &["optim.lr=fast"]),
        "recipes/x.yaml: override `optim.lr=fast`: optim.lr: invalid type: string \"fast\", expected f64"
    );
    assert_eq!(
        fails(&text, &["optim.lr=-1"]),
        "recipes/x.yaml: override `optim.lr=-1`: optim.lr must be > 0, got -1"
    );
}

#[test]
fn apply_overrides_refuses_to_replace_a_non_mapping_section() {
    let mut value: Value = serde_norway::from_str("optim: 3").unwrap();
    let err = apply_overrides(&mut value, &[("optim.lr".into(), Value::from(0.1))]).unwrap_err();
    assert_eq!(err, "optim is not a mapping, cannot set `optim.lr`");
}

#[test]
fn field_paths_lists_every_leaf() {
    let paths = field_paths();
    for expected in [
        "model.path",
        "loss.ma.weight",
        "adapters.lora.rank",
        "adapters.lora.targets",
        "data.max_train_windows",
        "ablate.grid",
        "ablate.points",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} missing from {paths:?}"
        );
    }
    assert!(
        !paths
            .iter()
            .any(|p| p == "adapters" || p == "adapters.lora"),
        "{paths:?}"
    );
}

#[test]
fn ablate_keys_are_checked_up_front() {
    let ok = format!("{MINIMAL}ablate:\n  grid:\n    optim.lr: [1.0e-3, 1.0e-4]\n  points:\n    - {{adapters.lora.rank: 4}}\n");
    let recipe = parse(&ok, &[]).unwrap();
    assert_eq!(recipe.ablate.grid["optim.lr"].len(), 2);
    let msg = fails(
        &format!("{MINIMAL}ablate:\n  grid:\n    optim.lrr: [1]\n"),
        &[],
    );
    assert_eq!(msg, "recipes/x.yaml:7:3: ablate.grid: unknown recipe field `optim.lrr`; did you mean `optim.lr`?");
    let msg = fails(
        &format!("{MINIMAL}ablate:\n  grid:\n    optim.lr: []\n"),
        &[],
    );
    assert!(
        msg.contains("ablate.grid.optim.lr must be a non-empty list"),
        "{msg}"
    );
    let msg = fails(
        &format!("{MINIMAL}ablate:\n  points:\n    - {{ablate.grid: {{}}}}\n"),
        &[],
    );
    assert!(
        msg.contains("ablate.points[0]: `ablate.grid` cannot vary the ablation itself"),
        "{msg}"
    );
}

#[test]
fn load_reports_a_missing_file_as_usage() {
    let err = load(Path::new("recipes/nope.yaml"), &[]).unwrap_err();
    assert!(err.is_usage());
    assert!(
        err.to_string()
            .starts_with("recipes/nope.yaml: cannot read recipe:"),
        "{err}"
    );
}

#[test]
fn load_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, MINIMAL).unwrap();
    assert_eq!(load(&path, &["train.seed=3".into()]).unwrap().train.seed, 3);
}

#[test]
fn texts_take_one_path_or_a_list() {
    let r = parse(
        "model:\n  path: m\ndata:\n  train: [a.txt, b.txt]\n  eval: e.txt\n  batch_size: 1\n  long:\n    seq_len: 64\n    windows: 2\n    every: 5\nverify:\n  text:\n    - x.txt\n    - y.txt\n  long:\n    seq_len: 256\n    windows: 1\n",
        &[],
    )
    .unwrap();
    let paths = |t: &Texts| {
        t.paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&r.data.train), ["a.txt", "b.txt"]);
    assert_eq!(paths(&r.data.eval), ["e.txt"]);
    assert_eq!(paths(r.verify.text.as_ref().unwrap()), ["x.txt", "y.txt"]);
    assert_eq!(
        r.data.long,
        Some(LongWindows {
            seq_len: 64,
            windows: 2,
            every: 5
        })
    );
    assert_eq!(
        r.verify.long,
        Some(VerifyWindows {
            seq_len: 256,
            windows: 1
        })
    );
    // Both forms survive the saved recipe, and an override can turn one into a list.
    assert_eq!(parse(&r.to_yaml(), &[]).unwrap(), r);
    let r = parse(MINIMAL, &["data.eval=[e.txt, f.txt]", "verify.text=v.txt"]).unwrap();
    assert_eq!(paths(&r.data.eval), ["e.txt", "f.txt"]);
    assert_eq!(paths(r.verify.text.as_ref().unwrap()), ["v.txt"]);
    assert_eq!(r.data.train, Texts::One("t.txt".into()));

    let msg = fails(MINIMAL, &["data.train=[]"]);
    assert!(
        msg.contains("data.train must be a file or a non-empty list of files"),
        "{msg}"
    );
    let msg = fails(MINIMAL, &["verify.text=[]"]);
    assert!(
        msg.contains("verify.text must be a file or a non-empty list of files"),
        "{msg}"
    );
    let msg = fails(MINIMAL, &["data.long={seq_len: 64, windows: 1, every: 2}"]);
    assert!(
        msg.contains("data.batch_size must be 1 when data.long is set"),
        "{msg}"
    );
    let msg = fails(
        MINIMAL,
        &[
            "data.batch_size=1",
            "data.long={seq_len: 64, windows: 1, every: 0}",
        ],
    );
    assert!(msg.contains("data.long.every"), "{msg}");
}
