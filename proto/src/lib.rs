//! Vendored gRPC contracts nodekit speaks with the kubelet and container runtimes, compiled at
//! build time without protoc (protox + tonic-prost-build), gRPC over unix sockets, and status
//! messages that keep an error's causes.
//!
//! Each protocol sits behind a cargo feature so a consumer compiles only the one it needs:
//! `csi` ([`csi::v1`]), `cri` ([`cri::v1`]), `deviceplugin` ([`deviceplugin::v1beta1`]).
//! The upstream versions are listed in `proto/README.md`.

pub mod status;
pub mod uds;

/// Container Storage Interface.
#[cfg(feature = "csi")]
pub mod csi {
    /// Package `csi.v1`: Identity, Controller, GroupController, SnapshotMetadata and Node
    /// services.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("csi.v1");
    }
}

/// Kubernetes Container Runtime Interface.
#[cfg(feature = "cri")]
pub mod cri {
    /// Package `runtime.v1`: RuntimeService and ImageService.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("runtime.v1");
    }
}

/// Kubelet device plugin API.
#[cfg(feature = "deviceplugin")]
pub mod deviceplugin {
    /// Package `v1beta1`: the kubelet's Registration service and the plugin's DevicePlugin
    /// service.
    pub mod v1beta1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("v1beta1");
    }
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "csi")]
    mod csi {
        use std::collections::HashMap;

        use prost::Message;
        use tokio::sync::oneshot;
        use tonic::{Request, Response, Status};

        use crate::csi::v1::identity_client::IdentityClient;
        use crate::csi::v1::identity_server::{Identity, IdentityServer};
        use crate::csi::v1::{
            controller_server, group_controller_server, identity_server, node_server,
            snapshot_metadata_server, GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse,
            GetPluginInfoRequest, GetPluginInfoResponse, ProbeRequest, ProbeResponse,
        };
        use crate::uds;

        fn plugin_info() -> GetPluginInfoResponse {
            GetPluginInfoResponse {
                name: "csi.nodekit.test".into(),
                vendor_version: "0.1.0".into(),
                manifest: HashMap::from([("k".into(), "v".into())]),
            }
        }

        #[test]
        fn a_message_survives_encode_and_decode() {
            let info = plugin_info();
            let decoded =
                GetPluginInfoResponse::decode(info.encode_to_vec().as_slice()).expect("decode");
            assert_eq!(decoded, info);
        }

        #[test]
        fn services_carry_their_csi_v1_names() {
            assert_eq!(identity_server::SERVICE_NAME, "csi.v1.Identity");
            assert_eq!(controller_server::SERVICE_NAME, "csi.v1.Controller");
            assert_eq!(node_server::SERVICE_NAME, "csi.v1.Node");
            assert_eq!(
                group_controller_server::SERVICE_NAME,
                "csi.v1.GroupController"
            );
            assert_eq!(
                snapshot_metadata_server::SERVICE_NAME,
                "csi.v1.SnapshotMetadata"
            );
        }

        struct FixedIdentity;

        #[tonic::async_trait]
        impl Identity for FixedIdentity {
            async fn get_plugin_info(
                &self,
                _: Request<GetPluginInfoRequest>,
            ) -> Result<Response<GetPluginInfoResponse>, Status> {
                Ok(Response::new(plugin_info()))
            }

            async fn get_plugin_capabilities(
                &self,
                _: Request<GetPluginCapabilitiesRequest>,
            ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
                Err(Status::unimplemented("not under test"))
            }

            async fn probe(
                &self,
                _: Request<ProbeRequest>,
            ) -> Result<Response<ProbeResponse>, Status> {
                Err(Status::unimplemented("not under test"))
            }
        }

        #[tokio::test]
        async fn identity_answers_over_a_unix_socket() {
            let dir = tempfile::tempdir().expect("tempdir");
            let socket = dir.path().join("csi/csi.sock");
            let incoming = uds::bind(&socket).expect("bind");
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(FixedIdentity))
                    .serve_with_incoming_shutdown(incoming, async {
                        stopped.await.ok();
                    }),
            );

            let channel = uds::connect(&socket).await.expect("connect");
            let reply = IdentityClient::new(channel)
                .get_plugin_info(GetPluginInfoRequest {})
                .await
                .expect("GetPluginInfo");
            assert_eq!(reply.into_inner(), plugin_info());

            stop.send(()).expect("server still running");
            server.await.expect("join").expect("server exits cleanly");
        }
    }

    #[cfg(feature = "cri")]
    mod cri {
        use prost::Message;

        use crate::cri::v1::{image_service_server, runtime_service_server, VersionResponse};

        #[test]
        fn a_message_survives_encode_and_decode() {
            let version = VersionResponse {
                version: "0.1.0".into(),
                runtime_name: "nodekit".into(),
                runtime_version: "0.1.0".into(),
                runtime_api_version: "v1".into(),
            };
            let decoded =
                VersionResponse::decode(version.encode_to_vec().as_slice()).expect("decode");
            assert_eq!(decoded, version);
        }

        #[test]
        fn services_carry_their_runtime_v1_names() {
            assert_eq!(
                runtime_service_server::SERVICE_NAME,
                "runtime.v1.RuntimeService"
            );
            assert_eq!(
                image_service_server::SERVICE_NAME,
                "runtime.v1.ImageService"
            );
        }
    }

    #[cfg(feature = "deviceplugin")]
    mod deviceplugin {
        use prost::Message;
        use tokio::sync::{mpsc, oneshot};
        use tonic::{Request, Response, Status};

        use crate::deviceplugin::v1beta1::registration_client::RegistrationClient;
        use crate::deviceplugin::v1beta1::registration_server::{Registration, RegistrationServer};
        use crate::deviceplugin::v1beta1::{
            device_plugin_server, registration_server, CdiDevice, ContainerAllocateResponse,
            DevicePluginOptions, Empty, RegisterRequest,
        };
        use crate::uds;

        #[test]
        fn a_message_survives_encode_and_decode() {
            let response = ContainerAllocateResponse {
                envs: [("VISIBLE_DEVICES".into(), "0".into())].into(),
                cdi_devices: vec![CdiDevice {
                    name: "nodekit.dev/fake=dev0".into(),
                }],
                ..Default::default()
            };
            let decoded = ContainerAllocateResponse::decode(response.encode_to_vec().as_slice())
                .expect("decode");
            assert_eq!(decoded, response);
        }

        #[test]
        fn services_carry_their_v1beta1_names() {
            assert_eq!(device_plugin_server::SERVICE_NAME, "v1beta1.DevicePlugin");
            assert_eq!(registration_server::SERVICE_NAME, "v1beta1.Registration");
        }

        /// Forwards every registration to the test.
        struct RecordingRegistration(mpsc::UnboundedSender<RegisterRequest>);

        #[tonic::async_trait]
        impl Registration for RecordingRegistration {
            async fn register(
                &self,
                request: Request<RegisterRequest>,
            ) -> Result<Response<Empty>, Status> {
                self.0
                    .send(request.into_inner())
                    .map_err(|_| Status::internal("test receiver gone"))?;
                Ok(Response::new(Empty {}))
            }
        }

        #[tokio::test]
        async fn registration_reaches_the_kubelet_side_over_a_unix_socket() {
            let dir = tempfile::tempdir().expect("tempdir");
            let socket = dir.path().join("kubelet.sock");
            let incoming = uds::bind(&socket).expect("bind");
            let (registered, mut registrations) = mpsc::unbounded_channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(RegistrationServer::new(RecordingRegistration(registered)))
                    .serve_with_incoming_shutdown(incoming, async {
                        stopped.await.ok();
                    }),
            );

            let request = RegisterRequest {
                version: "v1beta1".into(),
                endpoint: "fake.sock".into(),
                resource_name: "nodekit.dev/fake".into(),
                options: Some(DevicePluginOptions {
                    pre_start_required: false,
                    get_preferred_allocation_available: true,
                }),
            };
            let channel = uds::connect(&socket).await.expect("connect");
            RegistrationClient::new(channel)
                .register(request.clone())
                .await
                .expect("Register");
            assert_eq!(registrations.recv().await, Some(request));

            stop.send(()).expect("server still running");
            server.await.expect("join").expect("server exits cleanly");
        }
    }
}
