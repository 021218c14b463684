//! Memberships of people, as ProjectUser resources.

use std::collections::HashMap;

use serde_json::Value;

use super::{Export, Names, Snapshot, Target, membership_grants, metadata, skip, str_of, strings};
use crate::controller::tenancy::{self, Adoptee};
use crate::crd::{ProfileType, ProjectUser, ProjectUserSpec, UserDeletionPolicy, UserScope};

pub(super) fn export_users(
    snapshot: &Snapshot,
    target: &Target,
    policy_names: &HashMap<String, String>,
    out: &mut Export,
) {
    let mut names = Names::new(target, "ProjectUser");
    names.reserve(&snapshot.memberships);
    let people = snapshot
        .memberships
        .iter()
        .filter(|m| m.pointer("/user/reference").and_then(Value::as_str).is_some_and(|r| r.starts_with("User/")));
    let mut people: Vec<&Value> = people.collect();
    people.sort_by_key(|m| {
        (m.pointer("/user/display").and_then(Value::as_str).map(str::to_lowercase), str_of(m, "id").map(String::from))
    });
    for m in people {
        let id = str_of(m, "id").unwrap_or_default();
        let who = m.pointer("/user/display").and_then(Value::as_str).unwrap_or("unknown user");
        let what = format!("ProjectMembership/{id} ({who})");
        let spec = match user_spec(m, snapshot, target, policy_names) {
            Ok(spec) => spec,
            Err(why) => {
                skip(out, what, why);
                continue;
            }
        };
        let display = spec.email.clone().or_else(|| spec.external_id.clone());
        let display = display.as_deref().map(|d| d.split('@').next().unwrap_or(d));
        let name = names.name(m, display, "user");
        let member = Adoptee::Member { email: spec.email.as_deref(), external_id: spec.external_id.as_deref() };
        let refusal = names.refusal(m, &name, tenancy::adoption(&target.limits, &member, &what));
        match refusal {
            Some(why) => skip(out, what, why),
            None => out.users.push(ProjectUser { metadata: metadata(&name, &target.namespace), spec, status: None }),
        }
    }
}

fn user_spec(
    m: &Value,
    snapshot: &Snapshot,
    target: &Target,
    policy_names: &HashMap<String, String>,
) -> Result<ProjectUserSpec, String> {
    let profile_ref = m.pointer("/profile/reference").and_then(Value::as_str).unwrap_or_default();
    let resource_type = match profile_ref.split('/').next() {
        Some("Practitioner") => ProfileType::Practitioner,
        Some("Patient") => ProfileType::Patient,
        Some("RelatedPerson") => ProfileType::RelatedPerson,
        other => {
            return Err(format!("its profile is a {}, which a ProjectUser cannot declare", other.unwrap_or("nothing")));
        }
    };
    let profile =
        snapshot.references.get(profile_ref).ok_or_else(|| format!("its profile {profile_ref} cannot be read"))?;
    let human = profile.pointer("/name/0").ok_or_else(|| format!("its profile {profile_ref} has no name"))?;
    let given = strings(human, "given");
    let (first_name, last_name) = match (given.as_slice(), str_of(human, "family")) {
        ([first], Some(last)) => (first.clone(), last.to_string()),
        _ => return Err(format!("the name on {profile_ref} is not one given name and a family name")),
    };
    let user_ref = m.pointer("/user/reference").and_then(Value::as_str).unwrap_or_default();
    let user = snapshot.references.get(user_ref);
    let external_id = str_of(m, "externalId").or_else(|| user.and_then(|u| str_of(u, "externalId"))).map(String::from);
    let email = user
        .and_then(|u| str_of(u, "email"))
        .or_else(|| m.pointer("/user/display").and_then(Value::as_str).filter(|d| d.contains('@')))
        .map(str::to_lowercase)
        .filter(|_| external_id.is_none());
    if email.is_none() && external_id.is_none() {
        return Err("neither the email nor the external id of its user can be read".into());
    }
    let scope = user.map(|u| if u.get("project").is_some() { UserScope::Project } else { UserScope::Server });
    let (access, unrestricted_access, admin) = membership_grants(m, policy_names, &target.limits)?;
    Ok(ProjectUserSpec {
        connection_ref: target.connection_ref.clone(),
        resource_type,
        first_name,
        last_name,
        email,
        external_id,
        scope,
        admin,
        access,
        unrestricted_access,
        send_email: false,
        deletion_policy: UserDeletionPolicy::Orphan,
        adopt: true,
    })
}
