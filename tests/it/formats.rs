//! `format = "slack"` and `format = "template"` against receivers that
//! enforce their contracts: Slack's incoming webhooks (`400 no_text`,
//! `invalid_payload`, `429` with Retry-After), a CRM that wants its own JSON
//! or a form, and the shipped Follow Up Boss and HubSpot examples rendered
//! into what those APIs document. A template that cannot work is refused
//! at start; one that fails on an event dead-letters that event only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::cli::{args, cli};
use crate::common::receiver::{Received, Receiver, Reply, wait_for_requests};
use crate::common::*;
use leadflo_relay::config::{Config, Format, HeaderSource, Secret, TargetConfig};
use leadflo_relay::store::EventId;

/// A target with quick retries, so a test sees a retry within seconds.
fn target(name: &str, url: &str, format: Format) -> TargetConfig {
    let mut target = TargetConfig::new(name, url);
    target.format = format;
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "5s".parse().unwrap();
    target.timeout = "5s".parse().unwrap();
    target
}

fn template_target(name: &str, url: &str, template: &str) -> TargetConfig {
    let mut target = target(name, url, Format::Template);
    target.template = Some(template.to_owned());
    target
}

/// A lead with only what every lead has, and a one-word name.
const MINIMAL_LEAD: &str = r#"{"event":"visitor_created","timestamp":"2025-03-01T15:00:00.000Z",
"websiteId":"web_abc123","data":{"visitor":{"id":"vis_min","name":"Cher","email":"cher@example.com"}}}"#;

fn json_body(request: &Received) -> Value {
    serde_json::from_slice(&request.body).unwrap_or_else(|e| {
        panic!(
            "the target got a body that is not JSON ({e}): {}",
            String::from_utf8_lossy(&request.body)
        )
    })
}

/// Every request `receiver` got, by event id (its idempotency key).
fn by_event(receiver: &Receiver) -> HashMap<EventId, Received> {
    receiver
        .requests()
        .into_iter()
        .map(|r| (r.header("idempotency-key").parse().unwrap(), r))
        .collect()
}

// ---- Slack ---------------------------------------------------------------------

/// Slack's incoming-webhook contract: a JSON object with a non-empty `text`
/// or `blocks`, else `400 no_text`; a body that is not a JSON object,
/// `400 invalid_payload`; blocks beyond Slack's limits, `400
/// invalid_blocks`.
fn slack(_: usize, request: &Received) -> Reply {
    let invalid = |why: &str| Reply::status(400).body(why);
    if !request
        .header("content-type")
        .starts_with("application/json")
    {
        return invalid("invalid_payload");
    }
    let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&request.body) else {
        return invalid("invalid_payload");
    };
    let text = message.get("text").and_then(Value::as_str).unwrap_or("");
    let blocks = message.get("blocks").and_then(Value::as_array);
    if text.trim().is_empty() && blocks.is_none_or(|b| b.is_empty()) {
        return invalid("no_text");
    }
    if !blocks.into_iter().flatten().all(valid_block) {
        return invalid("invalid_blocks");
    }
    Reply::ok().body("ok")
}

/// A section or context block within Slack's limits: texts of 1 to 3000
/// characters, at most 10 fields of at most 2000, at most 10 elements.
fn valid_block(block: &Value) -> bool {
    let text_ok = |t: &Value, max: usize| {
        matches!(t["type"].as_str(), Some("mrkdwn" | "plain_text"))
            && t["text"]
                .as_str()
                .is_some_and(|s| !s.is_empty() && s.chars().count() <= max)
    };
    match block["type"].as_str() {
        Some("section") => {
            let fields = block["fields"].as_array();
            (block.get("text").is_some() || fields.is_some())
                && block.get("text").is_none_or(|t| text_ok(t, 3000))
                && fields.is_none_or(|f| f.len() <= 10 && f.iter().all(|t| text_ok(t, 2000)))
        }
        Some("context") => block["elements"]
            .as_array()
            .is_some_and(|e| !e.is_empty() && e.len() <= 10 && e.iter().all(|t| text_ok(t, 3000))),
        _ => false,
    }
}

/// Every mrkdwn text in a Slack message, `text` first, joined by newlines.
fn slack_texts(message: &Value) -> String {
    let mut out = vec![message["text"].as_str().unwrap_or("").to_owned()];
    for block in message["blocks"].as_array().into_iter().flatten() {
        out.extend(block["text"]["text"].as_str().map(str::to_owned));
        for item in ["fields", "elements"]
            .iter()
            .filter_map(|k| block[*k].as_array())
            .flatten()
        {
            out.extend(item["text"].as_str().map(str::to_owned));
        }
    }
    out.join("\n")
}

#[tokio::test]
async fn slack_gets_a_readable_message_for_every_event_even_unexpected_ones() {
    let hook = Receiver::start(slack).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("slack", &hook.url(), Format::Slack)];
    })
    .await;
    let lead = send(&relay, fixture("visitor_created.json")).await;
    let chat = send(&relay, fixture("conversation_ended.json")).await;
    let odd = send(
        &relay,
        br#"{"event":"visitor_created","data":{"visitor":"just a string"}}"#.to_vec(),
    )
    .await;
    let other = send(
        &relay,
        br#"{"event":"lead_scored","data":{"score":9}}"#.to_vec(),
    )
    .await;
    wait_for_requests(&hook, 4, "four messages at Slack").await;
    wait_for_empty_queue(&relay.store, "slack", "Slack's answers recorded").await;
    assert_eq!(
        relay.store.dead_letters("slack").unwrap(),
        vec![],
        "Slack refused a message (its reason is the dead letter's)"
    );
    let at_slack = by_event(&hook);
    let message = |id: EventId| json_body(&at_slack[&id]);

    let lead = message(lead);
    assert_eq!(lead["text"], "New lead: Sarah Johnson");
    let shown = slack_texts(&lead);
    for want in [
        "*Email*\nsarah@example.com",
        "*Phone*\n+1 555 123 4567",
        "*Intent*\nBuy",
        "*Time frame*\n1-3 mo",
        "*Urgency*\n72/100",
        "*Quality*\n88/100",
        "*Location*\nAustin, US",
        "*Referrer*\nhttps://zillow.com",
    ] {
        assert!(
            shown.contains(want),
            "{want:?} is not in the lead's message:\n{shown}"
        );
    }
    let chat = message(chat);
    assert_eq!(chat["text"], "Conversation ended: lead captured");
    let shown = slack_texts(&chat);
    for want in [
        "*Messages*\n12",
        "*Duration*\n8 min 7 s",
        "*Visitor*\nvis_xyz",
    ] {
        assert!(shown.contains(want), "{want:?} is not in:\n{shown}");
    }
    assert_eq!(message(odd)["text"], "New lead from LeadFloAgent");
    assert!(!slack_texts(&message(odd)).contains("null"));
    assert_eq!(message(other)["text"], "LeadFloAgent event: lead_scored");
    relay.stop().await;
}

#[tokio::test]
async fn slack_messages_escape_what_visitors_typed() {
    let hook = Receiver::start(slack).await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("slack", &hook.url(), Format::Slack)];
    })
    .await;
    let attack = json!({
        "event": "visitor_created",
        "data": {"visitor": {
            "name": "<!channel> Sarah & co",
            "email": "<https://evil.example|click here>",
            "referrer": "<@U024BE7LH>",
            "customFields": {"intent": "<!here|everyone>"},
        }},
    });
    send(&relay, serde_json::to_vec(&attack).unwrap()).await;
    wait_for_requests(&hook, 1, "the message at Slack").await;
    let body = String::from_utf8(hook.requests()[0].body.clone()).unwrap();
    for injected in ["<!channel>", "<https://evil", "<@U024BE7LH>", "<!here"] {
        assert!(
            !body.contains(injected),
            "{injected} reached Slack unescaped: {body}"
        );
    }
    let message: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["text"], "New lead: &lt;!channel&gt; Sarah &amp; co");
    let shown = slack_texts(&message);
    assert!(
        shown.contains("*Email*\n&lt;https://evil.example|click here&gt;"),
        "{shown}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn slack_rate_limits_are_waited_out_as_retry_after_says() {
    let hook = Receiver::start(|n, request| {
        if n == 0 {
            Reply::status(429)
                .header("retry-after", "1")
                .body("rate_limited")
        } else {
            slack(n, request)
        }
    })
    .await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![target("slack", &hook.url(), Format::Slack)];
    })
    .await;
    send(&relay, fixture("visitor_created.json")).await;
    wait_for_requests(&hook, 2, "the message after the 429").await;
    wait_for_empty_queue(&relay.store, "slack", "the delivery recorded").await;
    let requests = hook.requests();
    assert_eq!(requests.len(), 2, "one 429, then the delivery");
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "retried {gap:?} after Retry-After: 1"
    );
    assert_eq!(
        requests[1].body, requests[0].body,
        "the retry sent another message"
    );
    assert_eq!(json_body(&requests[1])["text"], "New lead: Sarah Johnson");
    assert_eq!(relay.metrics.attempts("slack", "success"), 1);
    relay.stop().await;
}

// ---- templates -----------------------------------------------------------------

#[tokio::test]
async fn a_template_posts_its_rendered_body_with_its_content_type() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let form = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        let mut json_target = template_target(
            "crm",
            &crm.url(),
            r#"{"lead": {"name": {{ data.visitor.name|tojson }},
  "phone": {{ data.visitor.phone|default(none)|tojson }}},
 "type": {{ event|tojson }}, "relay_id": {{ id|tojson }}, "received_at": {{ received_at|tojson }}}"#,
        );
        json_target.events = Some(vec!["visitor_created".into()]);
        json_target.content_type = Some("application/json; charset=utf-8".into());
        let mut form_target = template_target(
            "form",
            &form.url(),
            "{{ {'name': data.visitor.name, 'email': data.visitor.email,\n\
             'intent': (data.visitor.customFields|default({})).intent}|urlencode }}",
        );
        form_target.events = Some(vec!["visitor_created".into()]);
        form_target.content_type = Some("application/x-www-form-urlencoded".into());
        c.targets = vec![json_target, form_target];
    })
    .await;
    let lead = send(&relay, fixture("visitor_created_non_ascii.json")).await;
    wait_for_requests(&crm, 1, "the lead at the CRM").await;
    wait_for_requests(&form, 1, "the lead at the form").await;

    let at_crm = &crm.requests()[0];
    assert_eq!(
        at_crm.header("content-type"),
        "application/json; charset=utf-8"
    );
    let body = json_body(at_crm);
    assert_eq!(body["lead"]["name"], "Zoë Ångström-Nguyễn 王小明");
    assert_eq!(body["lead"]["phone"], "+49 30 1234567");
    assert_eq!(body["type"], "visitor_created");
    assert_eq!(body["relay_id"], lead.to_string());
    let received = body["received_at"].as_str().unwrap();
    let stored = stored_event(&relay.store, lead).await;
    assert_eq!(received, leadflo_relay::ops::rfc3339(stored.received_at_ms));

    let at_form = &form.requests()[0];
    assert_eq!(
        at_form.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let fields: HashMap<String, String> = serde_urlencoded::from_bytes(&at_form.body).unwrap();
    let want: HashMap<String, String> = [
        ("name", "Zoë Ångström-Nguyễn 王小明"),
        ("email", "zoe@exämple.com"),
        ("intent", "Sell"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(fields, want, "{}", String::from_utf8_lossy(&at_form.body));
    relay.stop().await;
}

#[tokio::test]
async fn an_event_the_template_fails_on_is_dead_lettered_and_the_next_delivered() {
    let crm = Receiver::start(|_, _| Reply::ok()).await;
    let relay = TestRelay::start_with(|c| {
        let mut t = template_target(
            "crm",
            &crm.url(),
            "{\"email\": {{ data.visitor.email|tojson }}}",
        );
        t.events = Some(vec!["visitor_created".into()]);
        c.targets = vec![t];
    })
    .await;
    let odd = send(
        &relay,
        br#"{"event":"visitor_created","data":{"lead":{"email":"private@example.com"}}}"#.to_vec(),
    )
    .await;
    let lead = send(&relay, fixture("visitor_created.json")).await;
    let dead = wait_for_dead_letters(&relay.store, "crm", 1).await;
    wait_for_requests(&crm, 1, "the good lead at the CRM").await;
    wait_for_empty_queue(&relay.store, "crm", "the delivery recorded").await;
    assert_eq!(dead[0].id, odd);
    assert_eq!(dead[0].reason, "template: undefined value (line 1)");
    assert!(!dead[0].reason.contains("private"), "{}", dead[0].reason);
    let requests = crm.requests();
    assert_eq!(requests.len(), 1, "an unrenderable event was sent anyway");
    assert_eq!(requests[0].header("idempotency-key"), lead.to_string());
    assert_eq!(
        json_body(&requests[0]),
        json!({"email": "sarah@example.com"})
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_broken_inline_template_stops_the_relay_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.targets = vec![template_target(
        "crm",
        "http://127.0.0.1:9/hook",
        "{\"name\": {{ data.visitor.name }\n}",
    )];
    let err = match leadflo_relay::Relay::build(config, Some(Secret::new(SECRET))).await {
        Ok(_) => panic!("a relay started with a template that does not parse"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        err.contains("target crm: template: syntax error: "),
        "{err}"
    );
    assert!(err.contains("(line 1)"), "{err}");
}

#[tokio::test]
async fn check_config_refuses_a_template_file_naming_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("crm.json.j2");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[[targets]]\nname = \"crm\"\nurl = \"https://crm.example/hook\"\n\
             format = \"template\"\ntemplate_file = {:?}\n",
            template.display().to_string()
        ),
    )
    .unwrap();
    let check = async || {
        let output = cli(args(&[
            "check-config",
            "--config",
            config.to_str().unwrap(),
        ]))
        .await;
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), said)
    };
    let key = format!("target crm: template_file {}: ", template.display());

    std::fs::write(
        &template,
        "{\n  \"name\": {{ data.visitor.name|tojson }\n}\n",
    )
    .unwrap();
    let (code, said) = check().await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(&format!("{key}syntax error: ")), "{said}");
    assert!(said.contains("(line 2)"), "{said}");

    // It parses, but a conversation_ended event has no visitor.
    std::fs::write(&template, "{\"name\": {{ data.visitor.name|tojson }}}\n").unwrap();
    let (code, said) = check().await;
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "{key}fails on LeadFloAgent's example conversation_ended event: undefined value (line 1)"
        )),
        "{said}"
    );

    std::fs::remove_file(&template).unwrap();
    let (code, said) = check().await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(&format!("{key}cannot read it")), "{said}");
}

// ---- the shipped examples ------------------------------------------------------

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// An example configuration with its template paths pointing into
/// `examples/` (the snippets name where an installation keeps them).
fn example_config(name: &str) -> String {
    let text = std::fs::read_to_string(examples_dir().join(name)).unwrap();
    text.replace(
        "/etc/leadflo-relay/templates/",
        &format!("{}/", examples_dir().display()),
    )
}

/// The example's target, delivering to `url` with `authorization` in
/// place of the header read from the environment.
fn example_target(name: &str, url: &str, authorization: &str) -> TargetConfig {
    let config = Config::parse(&example_config(name), name).unwrap();
    let mut target = config.targets.into_iter().next().unwrap();
    target.url = url.to_owned();
    target.retry.initial = "100ms".parse().unwrap();
    target.retry.max_interval = "1s".parse().unwrap();
    target.headers.insert(
        "authorization".into(),
        HeaderSource::Literal(authorization.into()),
    );
    target
}

#[test]
fn the_example_configurations_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["slack.toml", "followupboss.toml", "hubspot.toml"] {
        let path = dir.path().join(name);
        std::fs::write(&path, example_config(name)).unwrap();
        let output = Command::new(binary())
            .args(["check-config", "--config", path.to_str().unwrap()])
            .env("LEADFLO_WEBHOOK_SECRET", SECRET)
            .env("FUB_BASIC_AUTH", "dGVzdC1rZXk6")
            .env("HUBSPOT_TOKEN", "pat-na1-test")
            .env(
                "SLACK_WEBHOOK_URL",
                "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            )
            .env_remove("LEADFLO_RELAY_ADMIN_TOKEN")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "examples/{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
async fn the_follow_up_boss_example_sends_leads_as_its_api_documents() {
    let fub = Receiver::start(|_, request| {
        if request.header("authorization") == "Basic dGVzdC1rZXk6" {
            Reply::status(201).body(r#"{"id":1}"#)
        } else {
            Reply::status(401)
        }
    })
    .await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![example_target(
            "followupboss.toml",
            &fub.url(),
            "Basic dGVzdC1rZXk6",
        )];
    })
    .await;
    // Not a lead: the example's `events` leaves it out.
    send(&relay, fixture("conversation_ended.json")).await;
    let lead = send(&relay, fixture("visitor_created.json")).await;
    let seller = send(&relay, fixture("visitor_created_non_ascii.json")).await;
    let minimal = send(&relay, MINIMAL_LEAD.as_bytes().to_vec()).await;
    wait_for_requests(&fub, 3, "three leads at Follow Up Boss").await;
    wait_for_empty_queue(
        &relay.store,
        "followupboss",
        "three leads at Follow Up Boss",
    )
    .await;
    assert_eq!(relay.store.dead_letters("followupboss").unwrap(), vec![]);
    let at_fub = by_event(&fub);
    assert_eq!(at_fub.len(), 3, "only leads go to Follow Up Boss");
    for request in at_fub.values() {
        assert_eq!(request.header("content-type"), "application/json");
    }

    let body = json_body(&at_fub[&lead]);
    assert_eq!(body["source"], "LeadFloAgent");
    assert_eq!(body["type"], "General Inquiry");
    assert_eq!(
        body["message"],
        "Lead from the LeadFloAgent chat. Intent: Buy. Time frame: 1-3 mo. Urgency: 72/100. \
         Quality: 88/100. Location: Austin, US. Came from: https://zillow.com"
    );
    assert_eq!(
        body["person"],
        json!({
            "firstName": "Sarah",
            "lastName": "Johnson",
            "emails": [{"value": "sarah@example.com"}],
            "phones": [{"value": "+1 555 123 4567"}],
            "tags": ["LeadFloAgent", "Buy"],
        })
    );

    let body = json_body(&at_fub[&seller]);
    assert_eq!(body["type"], "Seller Inquiry");
    assert_eq!(body["person"]["firstName"], "Zoë");
    assert_eq!(body["person"]["lastName"], "Ångström-Nguyễn 王小明");
    assert_eq!(body["person"]["tags"], json!(["LeadFloAgent", "Sell"]));

    // What the visitor did not give is left out, not sent empty or null.
    let body = json_body(&at_fub[&minimal]);
    assert_eq!(
        body,
        json!({
            "source": "LeadFloAgent",
            "type": "General Inquiry",
            "message": "Lead from the LeadFloAgent chat",
            "person": {
                "firstName": "Cher",
                "emails": [{"value": "cher@example.com"}],
                "tags": ["LeadFloAgent"],
            },
        })
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_hubspot_example_creates_contacts_as_its_api_documents() {
    // HubSpot answers 409 CONTACT_EXISTS for an email it has: the example
    // counts that as delivered.
    let hubspot = Receiver::start(|n, request| {
        if request.header("authorization") != "Bearer pat-na1-test" {
            Reply::status(401)
        } else if n == 0 {
            Reply::status(201).body(r#"{"id":"1"}"#)
        } else {
            Reply::status(409).body(r#"{"status":"error","category":"OBJECT_ALREADY_EXISTS"}"#)
        }
    })
    .await;
    let relay = TestRelay::start_with(|c| {
        c.targets = vec![example_target(
            "hubspot.toml",
            &hubspot.url(),
            "Bearer pat-na1-test",
        )];
    })
    .await;
    send(&relay, fixture("conversation_ended.json")).await;
    let lead = send(&relay, fixture("visitor_created.json")).await;
    wait_for_requests(&hubspot, 1, "the first contact").await;
    let minimal = send(&relay, MINIMAL_LEAD.as_bytes().to_vec()).await;
    wait_for_requests(&hubspot, 2, "the second contact").await;
    wait_for_empty_queue(&relay.store, "hubspot", "HubSpot's answers recorded").await;
    assert_eq!(
        relay.store.dead_letters("hubspot").unwrap(),
        vec![],
        "a 409 from HubSpot was not counted as delivered"
    );
    let at_hubspot = by_event(&hubspot);
    assert_eq!(at_hubspot.len(), 2, "only leads go to HubSpot");
    assert_eq!(
        json_body(&at_hubspot[&lead]),
        json!({"properties": {
            "email": "sarah@example.com",
            "firstname": "Sarah",
            "lastname": "Johnson",
            "phone": "+1 555 123 4567",
            "city": "Austin",
            "country": "US",
            "lifecyclestage": "lead",
        }})
    );
    assert_eq!(
        json_body(&at_hubspot[&minimal]),
        json!({"properties": {
            "email": "cher@example.com",
            "firstname": "Cher",
            "lifecyclestage": "lead",
        }})
    );
    relay.stop().await;
}
