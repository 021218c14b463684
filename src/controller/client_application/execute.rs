//! Carrying the planned steps out, one at a time, until the plan says done or wait.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};
use secrecy::{ExposeSecret, SecretString};

use super::plan::{
    Answered, Observed, Step, client_body, generate_secret, identifier_of, plan, secret_content, secret_eq,
    settled_content,
};
use super::{Desired, ISSUED_AT, MAX_STEPS, PENDING_KEY, ROLLOUT_POLL};
use crate::controller::connection::UsableConnection;
use crate::controller::failure::ResourceError;
use crate::controller::secret::{SecretContent, apply_written, fingerprint};
use crate::controller::workload::{self};
use crate::controller::{Context, crash_point, event};
use crate::crd::ClientApplication;
use crate::medplum::{
    ClientApplicationResource, ClientCredentials, CredentialProof, MedplumError, MembershipResource, Ref,
};

pub(super) struct Reconciler<'a> {
    pub(super) ctx: &'a Context,
    pub(super) ca: &'a ClientApplication,
    pub(super) d: Desired,
    pub(super) usable: UsableConnection,
    /// Events of the steps carried out, published after the status write.
    pub(super) events: Vec<Event>,
}

impl Reconciler<'_> {
    fn normal(&mut self, reason: &str, action: &str, note: String) {
        self.events.push(event(EventType::Normal, reason, action, note));
    }

    fn updated(&mut self, target: &str, fields: &[&str]) {
        let observed = self.ca.status.as_ref().and_then(|s| s.observed_generation);
        self.events.push(crate::controller::update_event(
            observed,
            self.ca.metadata.generation,
            target,
            &fields.join(", "),
        ));
    }

    /// Whether a Secret with credentials was written for this resource before (status records it).
    fn had_secret_written(&self) -> bool {
        self.ca.status.as_ref().is_some_and(|s| s.secret_fingerprint.is_some())
    }

    /// Writes the operator's part of the Secret; `o` then holds the Secret as the API server returned it.
    async fn write_secret(&self, content: &SecretContent, o: &mut Observed) -> Result<(), ResourceError> {
        let (d, client, own) = (&self.d, &self.ctx.client, &self.ctx.own_writes);
        // The write's watch event may come before its answer: expected by the metadata it will show
        // (server-side apply keeps other managers' labels and annotations).
        let merged = |ours: &BTreeMap<String, String>, theirs: &BTreeMap<String, String>| {
            let mut all = theirs.clone();
            all.extend(ours.iter().map(|(k, v)| (k.clone(), v.clone())));
            all
        };
        let labels = merged(&content.labels, &o.secret.labels);
        let annotations = merged(&content.annotations, &o.secret.annotations);
        let fingerprint = crate::controller::meta_fingerprint(None, Some(&labels), Some(&annotations), &[]);
        own.expect("Secret", &d.namespace, &d.secret_name, fingerprint);
        let written = apply_written(client, &d.namespace, &d.secret_name, content, &secret_keys(d)).await;
        let version = written.as_ref().ok().and_then(|w| w.resource_version.clone());
        own.answered("Secret", &d.namespace, &d.secret_name, version.as_deref());
        o.secret = written?;
        Ok(())
    }

    /// Carries out one step; returns how long to wait when the step is a wait.
    async fn execute(
        &mut self,
        step: &Step,
        o: &mut Observed,
        now: Timestamp,
    ) -> Result<Option<Duration>, ResourceError> {
        match step {
            Step::StoreNewSecret => self.store_new_secret(o).await?,
            Step::CreateClient => self.create_client(o).await?,
            Step::UpdateClient { fields } => self.update_client(fields, o).await?,
            Step::CreateMembership => self.create_membership(o).await?,
            Step::UpdateMembership { fields } => self.update_membership(fields, o).await?,
            Step::PushSecret => {
                let actual = o.client.as_ref().expect("planned with a client");
                let body = client_body(&self.d.client, Some(actual), o.pending(), actual.secret.as_ref());
                self.put_client(&body, o).await?;
                crash_point("push-secret");
            }
            Step::WriteSecret { switched } => self.write_settled_secret(*switched, o, now).await?,
            Step::RestartTargets => self.restart_targets(o).await?,
            Step::WaitForRollout { .. } => return Ok(Some(ROLLOUT_POLL)),
            Step::WaitForGrace { until } => {
                let left = until.duration_since(now).unsigned_abs();
                return Ok(Some(left.max(Duration::from_secs(1))));
            }
            Step::RetireSecret => self.retire_secret(o).await?,
            Step::Verify => self.verify(o).await?,
            Step::Done => {}
        }
        Ok(None)
    }

    /// Writes a new secret into the Secret's pending key, before Medplum knows it: a crash after this
    /// finds it there and pushes the same one.
    async fn store_new_secret(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let mut data: BTreeMap<String, SecretString> = o
            .secret
            .values
            .iter()
            .filter(|(k, _)| k.as_str() != PENDING_KEY)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        data.insert(PENDING_KEY.into(), generate_secret());
        let issued = o.secret.annotations.get(ISSUED_AT).cloned();
        let content = secret_content(&self.d, o, data, issued, &Answered::now(&self.d, o));
        self.write_secret(&content, o).await?;
        crash_point("store-new-secret");
        Ok(())
    }

    async fn create_client(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let d = &self.d;
        let secret = o.pending().cloned().unwrap_or_else(generate_secret);
        let body = client_body(&d.client, None, Some(&secret), None);
        let condition = format!("_tag={}|{}", d.tag.system, d.tag.code);
        let created = self.usable.create_owned(&body, &d.tag.code, &condition).await?;
        crash_point("create-client");
        let id = created.id.as_deref().unwrap_or_default();
        self.normal("Created", "Create", format!("created Medplum ClientApplication/{id}"));
        o.client = Some(created);
        o.created = true;
        Ok(())
    }

    /// Replaces the Medplum client with `body` (at the version observed), and records the result.
    async fn put_client(&mut self, body: &ClientApplicationResource, o: &mut Observed) -> Result<(), ResourceError> {
        let actual = o.client.as_ref().expect("planned with a client");
        let (id, version) = (actual.id.clone().unwrap_or_default(), actual.meta.version_id.clone().unwrap_or_default());
        let updated = self.usable.client.update(&id, body, &version).await?;
        self.usable.view.record(&updated);
        o.client = Some(updated);
        Ok(())
    }

    async fn update_client(&mut self, fields: &[&'static str], o: &mut Observed) -> Result<(), ResourceError> {
        let actual = o.client.as_ref().expect("planned with a client");
        let body = client_body(&self.d.client, Some(actual), actual.secret.as_ref(), actual.retiring_secret.as_ref());
        let id = actual.id.clone().unwrap_or_default();
        self.put_client(&body, o).await?;
        if fields.contains(&"meta.tag") && self.d.adopt.as_ref().is_some_and(|a| a.client_id == id) {
            self.normal("Adopted", "Adopt", format!("took over Medplum ClientApplication/{id}"));
        } else {
            self.updated(&format!("ClientApplication/{id}"), fields);
        }
        Ok(())
    }

    async fn create_membership(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let d = &self.d;
        let client_id = o.client.as_ref().and_then(|c| c.id.clone()).unwrap_or_default();
        let client_ref = format!("ClientApplication/{client_id}");
        let body = MembershipResource {
            resource_type: "ProjectMembership".into(),
            project: Ref::to(format!("Project/{}", d.project_id)),
            user: Ref::to(client_ref.clone()),
            profile: Ref::to(client_ref.clone()),
            access: d.access.clone(),
            admin: d.admin.then_some(true),
            identifier: vec![identifier_of(&d.tag)],
            ..Default::default()
        };
        let created = self.usable.create_owned(&body, &d.tag.code, &format!("user={client_ref}")).await?;
        crash_point("create-membership");
        let membership = format!("ProjectMembership/{}", created.id.as_deref().unwrap_or_default());
        // One Event for a client made whole in this reconcile.
        let client_created = format!("created Medplum {client_ref}");
        match self.events.iter_mut().find(|e| e.note.as_deref() == Some(client_created.as_str())) {
            Some(event) => event.note = Some(format!("{client_created} and its {membership}")),
            None => self.normal("Created", "Create", format!("created Medplum {membership} for {client_ref}")),
        }
        o.membership = Some(created);
        Ok(())
    }

    async fn update_membership(&mut self, fields: &[&'static str], o: &mut Observed) -> Result<(), ResourceError> {
        let d = &self.d;
        let actual = o.membership.clone().expect("planned with a membership");
        let mut body = actual.clone();
        body.access = d.access.clone();
        body.access_policy = None;
        body.admin = d.admin.then_some(true);
        body.active = None;
        let identifier = identifier_of(&d.tag);
        if !body.identifier.contains(&identifier) {
            body.identifier.push(identifier);
        }
        let id = actual.id.clone().unwrap_or_default();
        let version = actual.meta.version_id.as_deref().unwrap_or_default();
        let updated = self.usable.client.update(&id, &body, version).await?;
        self.updated(&format!("ProjectMembership/{id}"), fields);
        self.usable.view.record(&updated);
        o.membership = Some(updated);
        Ok(())
    }

    /// Writes the client's credentials (the new secret once `switched`), with an Event for a rotation
    /// or for credentials that had to be put back.
    async fn write_settled_secret(
        &mut self,
        switched: bool,
        o: &mut Observed,
        now: Timestamp,
    ) -> Result<(), ResourceError> {
        let d = &self.d;
        let client = o.client.as_ref().expect("planned with a client");
        let client_id = client.id.clone().unwrap_or_default();
        let secret = client.secret.clone().expect("planned with a secret");
        let mut content = settled_content(d, o, &client_id, &secret, now);
        if switched {
            content.data.remove(PENDING_KEY);
        }
        let credentials_changed = o.value(&d.keys.client_id).is_none_or(|v| v.expose_secret() != client_id)
            || !secret_eq(o.value(&d.keys.client_secret), Some(&secret));
        let (existed, had_secret) = (o.secret.exists, o.value(&d.keys.client_secret).is_some());
        self.write_secret(&content, o).await?;
        crash_point("write-secret");
        let name = &self.d.secret_name;
        let restored = |action, note| event(EventType::Warning, "SecretRestored", action, note);
        let event = if switched && had_secret {
            let note = format!("Secret {name} switched to the new secret {}", fingerprint(&secret));
            Some(event(EventType::Normal, "Rotated", "Rotate", note))
        } else if credentials_changed && existed && had_secret {
            Some(restored("Update", format!("Secret {name} did not hold the client's credentials; restored them")))
        } else if !existed && !switched && self.had_secret_written() {
            Some(restored("Create", format!("Secret {name} was missing; recreated it")))
        } else {
            None
        };
        self.events.extend(event);
        Ok(())
    }

    /// Restarts the targets that have not yet restarted for the credentials issued last.
    async fn restart_targets(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let (client, d) = (&self.ctx.client, &self.d);
        let issued = o.secret.annotations.get(ISSUED_AT).cloned().unwrap_or_default();
        let mut restarted = Vec::new();
        for target in o.targets.iter_mut().filter(|t| t.exists && t.restarted_for.as_deref() != Some(issued.as_str())) {
            workload::restart(client, &d.namespace, &target.target, &issued).await?;
            restarted.push(format!("{:?}/{}", target.target.kind, target.target.name));
            *target = workload::observe(client, &d.namespace, &target.target, &d.secret_name).await?;
        }
        crash_point("restart-targets");
        let note = format!("restarted {} for the credentials issued at {issued}", restarted.join(", "));
        self.normal("Restarted", "Restart", note);
        Ok(())
    }

    async fn retire_secret(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let actual = o.client.as_ref().expect("planned with a client");
        let body = client_body(&self.d.client, Some(actual), actual.secret.as_ref(), None);
        let id = actual.id.clone().unwrap_or_default();
        self.put_client(&body, o).await?;
        crash_point("retire-secret");
        self.ctx.metrics.record_rotation();
        let note = format!("the previous secret of ClientApplication/{id} no longer works");
        self.normal("SecretRetired", "Rotate", note);
        Ok(())
    }

    /// Asks Medplum whether the Secret's credentials work.
    async fn verify(&mut self, o: &mut Observed) -> Result<(), ResourceError> {
        let client_id = o.client.as_ref().and_then(|c| c.id.clone()).unwrap_or_default();
        let secret = o.value(&self.d.keys.client_secret).cloned().expect("verified after the Secret was written");
        let credentials = ClientCredentials { client_id, client_secret: secret };
        match self.usable.client.check_credentials(&credentials).await {
            Ok(proof) => o.verified = Some(proof),
            Err(MedplumError::InvalidCredentials { description }) => {
                return Err(ResourceError::CredentialRejected(description));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

pub(super) fn secret_keys(d: &Desired) -> Vec<&str> {
    vec![&d.keys.base_url, &d.keys.client_id, &d.keys.client_secret, &d.keys.token_url, &d.keys.project_id, PENDING_KEY]
}

/// The `CredentialVerified` reason for each kind of proof.
pub(super) fn reason_of_proof(proof: CredentialProof) -> &'static str {
    match proof {
        CredentialProof::Authenticated => "SecretAccepted",
        CredentialProof::TokenIssued => "TokenIssued",
        CredentialProof::AddressNotAllowed => "SecretAcceptedAddressBlocked",
    }
}

pub(super) fn proof_of_reason(reason: &str) -> Option<CredentialProof> {
    [CredentialProof::Authenticated, CredentialProof::TokenIssued, CredentialProof::AddressNotAllowed]
        .into_iter()
        .find(|p| reason_of_proof(*p) == reason)
}

/// How a reconcile ended.
pub(super) enum Outcome {
    Done,
    Waiting(Step, Duration),
}

pub(super) async fn converge(r: &mut Reconciler<'_>, o: &mut Observed) -> Result<Outcome, ResourceError> {
    let mut updates: Vec<Step> = Vec::new();
    for _ in 0..MAX_STEPS {
        let now = Timestamp::now();
        let step = plan(&r.d, o, now);
        if matches!(step, Step::UpdateClient { .. } | Step::UpdateMembership { .. }) {
            if updates.contains(&step) {
                let fields = match &step {
                    Step::UpdateClient { fields } | Step::UpdateMembership { fields } => fields.join(", "),
                    _ => unreachable!(),
                };
                return Err(ResourceError::NotConverging(fields));
            }
            updates.push(step.clone());
        }
        if step == Step::Done {
            return Ok(Outcome::Done);
        }
        tracing::debug!(name = %r.d.name, namespace = %r.d.namespace, ?step, "ClientApplication step");
        match r.execute(&step, o, now).await {
            Ok(Some(wait)) => return Ok(Outcome::Waiting(step, wait)),
            Ok(None) => {}
            Err(e) => {
                if let ResourceError::Medplum(e) = &e
                    && e.leaves_object_uncertain()
                {
                    r.usable.view.doubt::<ClientApplicationResource>(&r.d.tag.code);
                    r.usable.view.doubt::<MembershipResource>(&r.d.tag.code);
                }
                return Err(e);
            }
        }
    }
    Err(ResourceError::NotConverging("the reconcile (too many steps)".into()))
}
