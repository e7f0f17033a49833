//! The soak, short (issue 19): three minutes of churn with agent kills and etcd member restarts
//! end with no lost ping, no failed request outside a fault window, nothing leaked, memory and
//! reconcile time flat. `deploy/bench/soak` runs the full 30 minutes.

use std::time::Duration;

use weft_tests::soak::{self, SoakOptions};

#[test]
fn three_minutes_of_churn_and_faults_end_with_nothing_leaked() {
    weft_tests::require_root();
    let options = SoakOptions::new(Duration::from_secs(180), 20261202);
    let report = soak::run(&options).expect("the soak ran");
    println!("{}", report.print());
    assert!(report.passed(), "{}", report.print());
}
