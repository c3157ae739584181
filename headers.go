package main

import (
	"context"
	"net/http"
	"net/http/httptrace"
	"strings"
)

// Which headers cross ccload, and which do not. Requests go upstream with
// every header the client sent but its credentials and cookies (the
// channel's key replaces them; see relay.rewrite and relay.prepare).
// Answers come back with every header the upstream sent but those that name
// or track the upstream, as nginx hides its backends' by default.

// credentialHeaders are the client's credentials, removed before anything
// goes upstream.
var credentialHeaders = []string{"Authorization", "X-Api-Key", "X-Goog-Api-Key"}

// hiddenResponseHeaders name the reseller behind a channel, its account or
// its load balancer, or set cookies for its host: none of it is the
// client's business, and cookies for the upstream would be set on ccload's
// origin. Request ids, rate-limit headers, Retry-After and the content
// headers pass.
var hiddenResponseHeaders = []string{
	"Server", "Set-Cookie", "Set-Cookie2", "Alt-Svc", "Via", "X-Powered-By",
	"Report-To", "Nel", "Strict-Transport-Security",
	"Openai-Organization", "Openai-Project", "Anthropic-Organization-Id",
	"X-Served-By", "X-Cache", "X-Cache-Hits", "X-Timer", "X-Envoy-Upstream-Service-Time",
}

// hiddenResponsePrefixes are families of load-balancer and CDN headers:
// Cloudflare's cf-ray and kin, CloudFront's x-amz-cf-*, Envoy's x-envoy-*,
// Kong's x-kong-*.
var hiddenResponsePrefixes = []string{"Cf-", "X-Amz-Cf-", "X-Envoy-", "X-Kong-"}

// hideUpstreamHeaders removes from h what the client must not see of the
// upstream. It runs on every answer ccload relays (ReverseProxy's
// ModifyResponse), before any header goes out.
func hideUpstreamHeaders(h http.Header) {
	for _, k := range hiddenResponseHeaders {
		delete(h, k)
	}
	for k := range h {
		for _, p := range hiddenResponsePrefixes {
			if strings.HasPrefix(k, p) {
				delete(h, k)
				break
			}
		}
	}
}

// withoutClientTrace hides the httptrace.ClientTrace that ReverseProxy puts
// on its outbound request. Its one hook relays an upstream's 1xx answers (103
// Early Hints, say) to the client at once, with their headers as the
// upstream sent them: past hideUpstreamHeaders, and from any channel tried,
// including one that then fails over. No client of an LLM API needs them,
// so ccload relays no 1xx at all.
type withoutClientTrace struct{ context.Context }

func (c withoutClientTrace) Value(key any) any {
	v := c.Context.Value(key)
	if _, ok := v.(*httptrace.ClientTrace); ok {
		return nil
	}
	return v
}
