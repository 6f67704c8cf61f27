//! `format = "template"`: a target's body rendered with minijinja (Jinja
//! syntax) from the event, for CRMs that want their own JSON or a form.
//!
//! The variables are the event's top-level fields (`event`, `timestamp`,
//! `websiteId`, `data`, and any other), `payload` (the whole parsed body),
//! `id` (the relay's event id, decimal) and `received_at` (RFC 3339, UTC).
//! A body that is not a JSON object leaves its fields undefined.
//!
//! Undefined values are semi-strict: printing or iterating one, or reading
//! a field of one, is an error, while `if`, `is defined` and `default`
//! test for them. So a misspelt field fails where it is written instead of
//! sending an empty value, and an optional field is written
//! `{{ data.visitor.phone|default("") }}` or inside `{% if … is defined %}`.
//!
//! A template is checked when the target is built: it must parse, and
//! render LeadFloAgent's two documented examples (and a lead with only its
//! name and email, which finds an optional field used without a guard),
//! as far as the target's `events` takes them. With a JSON `content_type`
//! (the default) every rendered body must be JSON.
//!
//! Rendered bodies and events hold personal data: a render error at
//! delivery names the engine's error kind and the template line, never a
//! value, and nothing here logs. Templates cannot read files (there is no
//! loader) and nest at most [`RECURSION_LIMIT`] levels deep.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bytes::Bytes;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use crate::config::TargetConfig;

use super::EventView;

/// How deep templates may nest (loops, conditions, macro calls): far more
/// than a request body needs, and little stack on a dispatcher's thread.
pub const RECURSION_LIMIT: usize = 100;

/// Instructions one render may run: far above what a request body for a
/// CRM needs, far below what would hold a dispatcher for long.
const FUEL: u64 = 1_000_000;

/// The template's name inside its environment (errors give only its line).
const NAME: &str = "body";

/// One of the events a template is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Example {
    /// Its `event` field: a target whose `events` leaves it out is not
    /// checked against it.
    pub event: &'static str,
    /// What it is, in a configuration error.
    pub what: &'static str,
    pub body: &'static str,
}

/// LeadFloAgent's documented example payloads, and the documented lead
/// with only the fields every lead has (its name and email).
pub const EXAMPLES: [Example; 3] = [
    Example {
        event: "visitor_created",
        what: "LeadFloAgent's example visitor_created event",
        body: include_str!("examples/visitor_created.json"),
    },
    Example {
        event: "conversation_ended",
        what: "LeadFloAgent's example conversation_ended event",
        body: include_str!("examples/conversation_ended.json"),
    },
    Example {
        event: "visitor_created",
        what: "a visitor_created event without its optional fields (phone, city, country, \
               referrer, firstSeenAt, scores, customFields)",
        body: include_str!("examples/visitor_created_minimal.json"),
    },
];

/// A compiled template and what its output must be.
pub struct Template {
    /// Boxed: an environment is large, and a target's `Shape` holds this.
    env: Box<Environment<'static>>,
    /// Whether the body must be JSON (a JSON `content_type`).
    json: bool,
    /// The template's text, so a reload can tell whether it changed.
    source: String,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

/// Why a body could not be made.
#[derive(Debug)]
enum RenderError {
    Engine(minijinja::Error),
    NotJson(serde_json::Error),
}

/// Whether an error may quote the engine's detail: at delivery it could
/// hold a value of the event (`unable to calculate 'Sarah' + 1`); against
/// the built-in examples it holds nothing personal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    Quoted,
    Withheld,
}

impl RenderError {
    fn describe(&self, detail: Detail) -> String {
        match self {
            RenderError::Engine(err) => describe(err, detail),
            // serde_json's messages say what was expected where, never
            // what was there.
            RenderError::NotJson(err) => format!(
                "the rendered body is not JSON ({err}); use `tojson` for values, or set \
                 content_type"
            ),
        }
    }
}

impl Template {
    /// Compiles the target's `template` or `template_file` and checks it
    /// against [`EXAMPLES`]; errors name the target, the key (and file) and
    /// the engine's message.
    pub fn from_config(config: &TargetConfig) -> anyhow::Result<Template> {
        let target = &config.name;
        let (key, source) = match (&config.template, &config.template_file) {
            (Some(inline), None) => ("template".to_owned(), inline.clone()),
            (None, Some(path)) => {
                let key = format!("template_file {}", path.display());
                let source = std::fs::read_to_string(path).map_err(|err| {
                    anyhow::anyhow!("target {target}: {key}: cannot read it: {err}")
                })?;
                (key, source)
            }
            _ => anyhow::bail!(
                "target {target}: template: expected exactly one of template or template_file"
            ),
        };
        let content_type = config.content_type.as_deref().unwrap_or("application/json");
        let template = Template::compile(source, is_json(content_type)).map_err(|err| {
            anyhow::anyhow!("target {target}: {key}: {}", describe(&err, Detail::Quoted))
        })?;
        let takes = |event: &str| {
            config
                .events
                .as_ref()
                .is_none_or(|events| events.iter().any(|e| e == event))
        };
        for example in EXAMPLES.iter().filter(|e| takes(e.event)) {
            let body = Bytes::from_static(example.body.as_bytes());
            let view = EventView {
                id: crate::store::EventId(1),
                received_at_ms: 1_740_838_920_000,
                body: &body,
            };
            if let Err(err) = template.render_view(&view) {
                anyhow::bail!(
                    "target {target}: {key}: fails on {}: {}{}",
                    example.what,
                    err.describe(Detail::Quoted),
                    hint(&err)
                );
            }
        }
        Ok(template)
    }

    /// Compiles `source`; a syntax error is returned as the engine gives it.
    pub fn compile(source: String, json: bool) -> Result<Template, minijinja::Error> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        // Escaping is the template's choice (`tojson`, `urlencode`), the
        // same whatever a template file is called.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        // A line holding only `{% … %}` leaves nothing in the body.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Debug info copies the variables into errors: personal data.
        env.set_debug(false);
        env.set_recursion_limit(RECURSION_LIMIT);
        // A bounded amount of work per render, so a template with a runaway
        // loop fails its event instead of holding a dispatcher.
        env.set_fuel(Some(FUEL));
        env.add_template_owned(NAME, source.clone())?;
        Ok(Template {
            env: Box::new(env),
            json,
            source,
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The body for `event`; an error names the problem and the template
    /// line, never a value of the event.
    pub fn render(&self, event: &EventView<'_>) -> Result<Bytes, String> {
        self.render_view(event)
            .map_err(|err| err.describe(Detail::Withheld))
    }

    fn render_view(&self, event: &EventView<'_>) -> Result<Bytes, RenderError> {
        let template = self.env.get_template(NAME).map_err(RenderError::Engine)?;
        let body = template
            .render(variables(event))
            .map_err(RenderError::Engine)?;
        if self.json {
            serde_json::from_str::<serde::de::IgnoredAny>(&body).map_err(RenderError::NotJson)?;
        }
        Ok(Bytes::from(body))
    }
}

/// The template's variables for `event`.
fn variables(event: &EventView<'_>) -> BTreeMap<String, Value> {
    let mut variables = BTreeMap::new();
    if let Ok(payload) = serde_json::from_slice::<serde_json::Value>(event.body) {
        if let serde_json::Value::Object(fields) = &payload {
            for (name, value) in fields {
                variables.insert(name.clone(), Value::from_serialize(value));
            }
        }
        variables.insert("payload".to_owned(), Value::from_serialize(&payload));
    }
    // The relay's own: they win over top-level fields of the same name.
    variables.insert("id".to_owned(), Value::from(event.id.0.to_string()));
    variables.insert(
        "received_at".to_owned(),
        Value::from(crate::ops::rfc3339(event.received_at_ms)),
    );
    variables
}

/// `application/json` or any `…+json` media type.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

/// The engine's error kind, its detail when allowed, and the line.
fn describe(err: &minijinja::Error, detail: Detail) -> String {
    let mut text = err.kind().to_string();
    if let Some(said) = err.detail() {
        if detail == Detail::Quoted || names_only_the_template(err.kind()) {
            let _ = write!(text, ": {said}");
        }
    }
    if let Some(line) = err.line() {
        let _ = write!(text, " (line {line})");
    }
    text
}

/// Kinds whose detail names only what the template wrote (a filter, a
/// function, an argument), never a value.
fn names_only_the_template(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::UnknownFilter
            | ErrorKind::UnknownTest
            | ErrorKind::UnknownFunction
            | ErrorKind::UnknownMethod
            | ErrorKind::TooManyArguments
            | ErrorKind::MissingArgument
            | ErrorKind::TemplateNotFound
    )
}

/// What to do about a template that fails on an example.
fn hint(err: &RenderError) -> &'static str {
    match err {
        RenderError::Engine(err) if err.kind() == ErrorKind::UndefinedError => {
            "; test an optional field with `is defined` or give it a `default`, or limit the \
             target to the events it is written for with `events`"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(template: &str) -> TargetConfig {
        let mut config = TargetConfig::new("crm", "https://crm.example/hook");
        config.format = crate::config::Format::Template;
        config.template = Some(template.to_owned());
        config
    }

    fn render(template: &str, body: &str) -> Result<String, String> {
        let template = Template::compile(template.to_owned(), false).unwrap();
        let body = Bytes::copy_from_slice(body.as_bytes());
        let view = EventView {
            id: crate::store::EventId(7),
            received_at_ms: 1_740_838_920_123,
            body: &body,
        };
        template
            .render(&view)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    const LEAD: &str = include_str!("examples/visitor_created.json");

    #[test]
    fn variables_are_the_top_level_fields_and_the_relays_own() {
        let got = render(
            "{{ event }} {{ timestamp }} {{ websiteId }} {{ data.visitor.name }} {{ id }} \
             {{ received_at }} {{ payload.data.visitor.customFields.intent }}",
            LEAD,
        )
        .unwrap();
        assert_eq!(
            got,
            "visitor_created 2025-03-01T14:22:00.000Z web_abc123 Sarah Johnson 7 \
             2025-03-01T14:22:00.123Z Buy"
        );
    }

    #[test]
    fn optional_fields_are_tested_with_is_defined_and_default() {
        let template = "{% if data.visitor.phone is defined %}p{% endif %}\
                        {% if data.visitor.phone %}t{% endif %}\
                        [{{ data.visitor.phone|default('none') }}]\
                        {{ data.visitor.phone|default(none)|tojson }}";
        assert_eq!(
            render(template, LEAD).unwrap(),
            "pt[+1 555 123 4567]\"+1 555 123 4567\""
        );
        let without = r#"{"event":"visitor_created","data":{"visitor":{"name":"A"}}}"#;
        assert_eq!(render(template, without).unwrap(), "[none]null");
    }

    #[test]
    fn a_misspelt_field_is_an_error_not_an_empty_value() {
        let err = render("{\n\"name\": {{ data.visitor.nmae }}\n}", LEAD).unwrap_err();
        assert_eq!(err, "undefined value (line 2)");
        let err = render("{{ data.visiter.name|default('x') }}", LEAD).unwrap_err();
        assert_eq!(err, "undefined value (line 1)");
    }

    #[test]
    fn render_errors_at_delivery_never_quote_the_event() {
        // The engine's own message is "unable to calculate 88 // 0": the
        // reason keeps only its kind and line.
        let err = render("{{ data.visitor.qualityScore // 0 }}", LEAD).unwrap_err();
        assert_eq!(err, "invalid operation (line 1)");
        let err = render("{{ data.visitor.name ~ (data.visitor.email + 1) }}", LEAD).unwrap_err();
        assert!(
            err.starts_with("invalid operation") && err.ends_with("(line 1)"),
            "{err}"
        );
        assert!(!err.contains("sarah"), "{err}");
    }

    #[test]
    fn a_body_that_is_not_json_leaves_the_fields_undefined() {
        assert_eq!(
            render(
                "{{ id }} {{ event is defined }} {{ payload is defined }}",
                "not json"
            )
            .unwrap(),
            "7 False False"
        );
        assert_eq!(
            render("{{ data.visitor.name }}", "not json").unwrap_err(),
            "undefined value (line 1)"
        );
    }

    #[test]
    fn a_json_content_type_requires_a_json_body() {
        let template =
            Template::compile("{\"name\": \"{{ data.visitor.name }}\"}".into(), true).unwrap();
        let body = Bytes::from_static(br#"{"data":{"visitor":{"name":"Sarah \"The Closer\" J"}}}"#);
        let view = EventView {
            id: crate::store::EventId(7),
            received_at_ms: 0,
            body: &body,
        };
        let err = template.render(&view).unwrap_err();
        assert!(err.starts_with("the rendered body is not JSON"), "{err}");
        assert!(!err.contains("Closer"), "{err}");
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/vnd.api+json"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }

    #[test]
    fn a_syntax_error_names_target_key_and_line() {
        let err = Template::from_config(&config("{\n\"a\": {{ event \n}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("target crm: template: syntax error: "),
            "{err}"
        );
        assert!(err.contains("(line "), "{err}");
    }

    #[test]
    fn a_template_file_is_read_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.json.j2");
        std::fs::write(&path, "{\"email\": {{ data.visitor.email|tojson }}}\n").unwrap();
        let mut config = config("");
        config.template = None;
        config.template_file = Some(path.clone());
        config.events = Some(vec!["visitor_created".into()]);
        let template = Template::from_config(&config).unwrap();
        assert!(template.json);

        std::fs::write(&path, "{% for %}").unwrap();
        let err = Template::from_config(&config).unwrap_err().to_string();
        let want = format!("target crm: template_file {}: syntax error", path.display());
        assert!(err.starts_with(&want), "{err}");

        config.template_file = Some(dir.path().join("missing.j2"));
        let err = Template::from_config(&config).unwrap_err().to_string();
        assert!(err.contains("missing.j2: cannot read it"), "{err}");
    }

    #[test]
    fn a_template_must_render_the_examples_its_target_takes() {
        let lead_only = "{{ {'email': data.visitor.email}|tojson }}";
        let err = Template::from_config(&config(lead_only))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "target crm: template: fails on LeadFloAgent's example conversation_ended event: \
                 undefined value (line 1)"
            ),
            "{err}"
        );
        assert!(err.contains("`events`"), "{err}");
        let mut leads = config(lead_only);
        leads.events = Some(vec!["visitor_created".into()]);
        Template::from_config(&leads).unwrap();

        // An optional field used without a guard fails on the lead that
        // lacks it, at start rather than at the first such lead.
        leads.template = Some("{{ {'phone': data.visitor.phone ~ ''}|tojson }}".into());
        let err = Template::from_config(&leads).unwrap_err().to_string();
        assert!(err.contains("without its optional fields"), "{err}");

        leads.template = Some("{\"email\": {{ data.visitor.email }}}".into());
        let err = Template::from_config(&leads).unwrap_err().to_string();
        assert!(err.contains("not JSON"), "{err}");
        assert!(err.contains("tojson"), "{err}");
    }

    #[test]
    fn the_embedded_examples_are_the_seeds() {
        for (embedded, fixture) in [
            (
                EXAMPLES[0].body,
                include_str!("../../tests/fixtures/visitor_created.json"),
            ),
            (
                EXAMPLES[1].body,
                include_str!("../../tests/fixtures/conversation_ended.json"),
            ),
        ] {
            let embedded: serde_json::Value = serde_json::from_str(embedded).unwrap();
            let fixture: serde_json::Value = serde_json::from_str(fixture).unwrap();
            assert_eq!(embedded, fixture);
        }
    }

    #[test]
    fn templates_cannot_read_files_or_recurse_without_end() {
        let err = render("{% include '/etc/passwd' %}", LEAD).unwrap_err();
        assert!(err.starts_with("template not found"), "{err}");
        let err = render(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            LEAD,
        )
        .unwrap_err();
        assert!(err.starts_with("invalid operation"), "{err}");
    }

    #[test]
    fn a_runaway_loop_fails_its_event_instead_of_running_on() {
        let template =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let err = render(template, r#"{"event":"visitor_created"}"#).unwrap_err();
        assert!(err.contains("fuel"), "{err}");
    }
}
