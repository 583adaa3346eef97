//! `ziplm inspect` snapshots of every pruned fixture (insta). The plans use fixed
//! levels, so the shapes (not which heads) are what the snapshots pin down.

use super::tract_fixtures::{load, workload, FIXTURES};
use ziplm::database::{Database, DatabaseConfig};
use ziplm::search::Selection;

#[test]
fn inspect_pruned_fixtures() {
    for name in FIXTURES {
        let mut m = load(name);
        m.set_calibration(ziplm::data::random_samples(128, 16, 16, 1))
            .unwrap();
        let db =
            Database::build(&mut m, &DatabaseConfig::default(), &ziplm::progress::Quiet).unwrap();
        // Layer 0: one level off attention, two off the FFN; layer 1: FFN removed.
        let levels: Vec<usize> = db
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| match i {
                0 => 1,
                1 => 2,
                3 => b.levels.len() - 1,
                _ => 0,
            })
            .collect();
        let sel = Selection { levels };
        let bytes = ziplm::backend::tract::onnx::emit(
            &m,
            &db.plan(&sel).unwrap(),
            &db.pruned_weights(&sel).unwrap(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, bytes).unwrap();
        let structure = ziplm::backend::load_structure(&path, &workload(name)).unwrap();
        insta::assert_snapshot!(
            format!("inspect_{name}"),
            ziplm::inspect::inspect_text(&structure)
        );
    }
}
