//! Every shipped recipe parses, validates, and says in its header what it is for and how to run it.

use eabfit::pretrain::PretrainRecipe;
use eabfit::recipe::{load_typed, parse_typed};

/// `pretrain-*.yaml` are pretraining recipes, every other one a training recipe.
#[test]
fn shipped_recipes_load_and_document_their_launch_command() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let header: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
        assert!(header.len() >= 2, "{}: no header", p.display());
        assert!(
            header.iter().any(|l| l.contains("eabfit ")),
            "{}: header gives no command",
            p.display()
        );
        // The resolved copy a run saves parses back to the same recipe.
        let pretrain = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pretrain-"));
        if pretrain {
            let r: PretrainRecipe =
                load_typed(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(
                parse_typed::<PretrainRecipe>(&r.to_yaml(), "resolved", &[]).unwrap(),
                r
            );
        } else {
            let r =
                eabfit::recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert_eq!(
                eabfit::recipe::parse_str(&r.to_yaml(), "resolved", &[]).unwrap(),
                r
            );
        }
        n += 1;
    }
    assert!(n >= 8, "{n} recipes");
}
