//! Request/reply frames and attach reports: arbitrary bytes through `rpc::decode` and
//! `Report::decode`. Never a panic; whatever decodes round-trips; a report carried in a reply is
//! decoded too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rusm_cluster_core::report::Report;
use rusm_cluster_core::rpc::{self, Reply, RpcFrame};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = rpc::decode(data) {
        assert_eq!(rpc::decode(&rpc::encode(&frame)), Ok(frame.clone()));
        if let RpcFrame::Reply {
            reply: Reply::Report(body),
            ..
        } = frame
        {
            let _ = Report::decode(&body);
        }
    }
    if let Ok(report) = Report::decode(data) {
        assert_eq!(Report::decode(&report.encode()), Ok(report));
    }
});
