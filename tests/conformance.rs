//! The conformance matrix: every behaviour case in `cases/` runs once per transport backend, so a
//! test's name says which backend it ran on (`quinn::send_by_name`). `cargo test quinn::` runs
//! one backend. The third arm, `mem::`, is the in-memory transport (real TLS, no sockets), held
//! to the same cases as the QUIC stacks. Every case runs twice per backend: with the default
//! send path (a busy link coalesces) and under `per_stream::` with coalescing off
//! (`per_stream::quinn::send_by_name`).

mod cases;

/// Instantiates every case for one backend; `$wrap` runs each case's future (see `per_stream`).
macro_rules! matrix {
    ($backend:ident => $transport:ty) => {
        matrix!($backend => $transport, std::convert::identity);
    };
    ($backend:ident => $transport:ty, $wrap:path) => {
        mod $backend {
            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $wrap(crate::cases::$name::<$transport>()).await
                    }
                };
            }
            case!(send_by_name);
            case!(send_to_pid_and_reply);
            case!(per_pair_order_survives_10k_messages);
            case!(untrusted_ca_is_rejected);
            case!(revoked_certificate_is_rejected);
            case!(impostor_name_is_rejected);
            case!(wrong_node_at_address_is_rejected);
            case!(unknown_protocol_version_is_rejected);
            case!(malformed_control_frame_closes_only_that_link);
            case!(oversized_control_frame_closes_only_that_link);
            case!(message_over_max_size_is_refused_by_sender);
            case!(oversized_stream_is_stopped_by_receiver);
            case!(send_errors_are_typed);
            case!(remote_unknown_name_is_a_counted_dead_letter);
            case!(peer_shutdown_raises_node_down_and_sends_fail);
            case!(goodbye_delivers_every_message_in_flight);
            case!(simultaneous_dials_keep_one_link);
            case!(shared_identity_cluster_works);
            case!(large_and_small_messages_flow_together);
            case!(silent_peer_is_declared_down);
            case!(a_lost_link_reconnects_by_itself);
            case!(a_restarted_peer_replaces_its_stale_link);
            case!(revoking_a_connected_peer_closes_its_link);
            case!(a_connection_flood_holds_a_bounded_number_of_places);
            case!(half_sent_large_message_does_not_block_small_ones);
            case!(lost_notice_releases_the_pair);
            case!(coalescing_keeps_order_and_loses_nothing);
            case!(coalesced_goodbye_flushes_the_queue);
            case!(several_messages_on_one_stream_are_split);
            case!(an_endless_stream_stays_within_the_link_budget);
            case!(delivered_waits_for_the_peer);
            case!(small_messages_overtake_a_large_one);
            case!(small_messages_overtake_a_large_one_when_coalescing);
            case!(shared_and_ca_identities_do_not_mix);
            case!(capability_frames_reach_only_links_that_negotiated_them);
            case!(unannounced_capability_frame_closes_only_that_link);
            case!(a_frame_the_capability_refuses_closes_only_that_link);
            case!(five_nodes_joined_through_one_form_a_full_mesh);
            case!(global_names_register_route_and_unregister);
            case!(a_global_name_goes_when_its_process_exits);
            case!(a_global_name_goes_with_its_node);
            case!(a_blocked_peer_stays_cut);
            case!(a_partition_heals_to_one_owner_and_the_loser_is_told);
            case!(a_hidden_node_never_joins_the_mesh_or_the_registry);
            case!(names_registered_before_joining_reach_every_node);
            case!(call_gets_the_reply_or_a_typed_error);
            case!(spawn_remote_runs_only_registered_factories);
            case!(monitors_fire_once_with_the_exit_reason);
            case!(demonitor_and_node_monitors);
            case!(requests_and_monitors_fail_when_the_node_is_lost);
            case!(attach_reads_the_report_without_joining);
            case!(a_node_restarts_on_its_old_address);
            case!(a_node_runs_on_the_runtime_it_is_given);
            case!(exited_processes_leave_no_pair_state);
            case!(a_cancelled_send_is_lost_not_malformed);
            case!(a_stream_of_large_messages_past_the_window_arrives);
            case!(soak_every_message_is_accounted_for);
            case!(messages_lost_in_transit_are_counted_on_relink);

            /// The long soak: five minutes (`cargo test --release -- --ignored soak_long`).
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[ignore = "five minutes"]
            async fn soak_long() {
                $wrap(crate::cases::soak::<$transport>(std::time::Duration::from_secs(300))).await
            }
        }
    };
}

matrix!(quinn => rusm_transport_quinn::QuinnTransport);
matrix!(s2n => rusm_transport_s2n::S2nTransport);
matrix!(mem => rusm_transport_mem::MemTransport);

/// Nodes on different backends in one cluster, in both dialling directions; `$wrap` as in
/// `matrix!`.
macro_rules! mixed {
    ($module:ident, $wrap:path) => {
        mod $module {
            use rusm_transport_quinn::QuinnTransport;
            use rusm_transport_s2n::S2nTransport;

            macro_rules! pair {
                ($name:ident => $case:ident::<$a:ty, $b:ty>) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $wrap(crate::cases::$case::<$a, $b>()).await
                    }
                };
            }
            pair!(quinn_dials_s2n => mixed_cluster::<QuinnTransport, S2nTransport>);
            pair!(s2n_dials_quinn => mixed_cluster::<S2nTransport, QuinnTransport>);
            pair!(s2n_refused_by_quinn_reads_the_same => mixed_refusals_read_the_same::<S2nTransport, QuinnTransport>);
            pair!(quinn_refused_by_s2n_reads_the_same => mixed_refusals_read_the_same::<QuinnTransport, S2nTransport>);
            pair!(quinn_and_s2n_form_one_mesh => mixed_mesh_with_global_names::<QuinnTransport, S2nTransport>);
            pair!(s2n_and_quinn_form_one_mesh => mixed_mesh_with_global_names::<S2nTransport, QuinnTransport>);
        }
    };
}

mixed!(mixed, std::convert::identity);

/// The same cases with coalescing off: every message on a stream of its own, the send path of a
/// link that is never busy enough to coalesce (`per_stream::quinn::send_by_name`).
mod per_stream {
    matrix!(quinn => rusm_transport_quinn::QuinnTransport, rusm_testkit::per_stream);
    matrix!(s2n => rusm_transport_s2n::S2nTransport, rusm_testkit::per_stream);
    matrix!(mem => rusm_transport_mem::MemTransport, rusm_testkit::per_stream);
    mixed!(mixed, rusm_testkit::per_stream);
}
