//! End-to-end tests of the scae tools (`tests/*.rs`); they run the release binaries through
//! the helpers of `scae-testkit`.
