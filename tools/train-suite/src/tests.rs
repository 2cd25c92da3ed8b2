//! Tests of `train-suite`'s flags.

use super::*;
use clap::CommandFactory;

/// Every flag enters the run's configuration (what --resume compares, flag by flag) except
/// the few that cannot change the result; a new flag enters by default.
#[test]
fn the_run_config_holds_every_flag_that_can_change_the_run() {
    let args = Args::parse_from(["train-suite", "--acts", "a", "--out", "o", "--steps", "1"]);
    let bad = scae::cli::run_config_mismatches(&Args::command(), &args);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(Args::command().get_arguments().count() > 20);
}
