-- Prosody for `bench/compare`. The @NAME@ fields are filled in by
-- bench/loadgen/servers.py, which writes the result into the run's temp dir
-- and starts `prosody --config <that file> -F` as its own child process.
-- Matched to the mlink side: same certificate, TLS optional on c2s (the
-- load generator decides: STARTTLS or plain), PLAIN allowed on plain TCP,
-- SCRAM-SHA-256 with 4096 PBKDF2 iterations, the same IM modules, quiet logs.

run_as_root = true            -- the bench machine runs everything as root
pidfile = "@DATA@/prosody.pid"
certificates = "@DATA@"
data_path = "@DATA@"
network_backend = "epoll"
log = { warn = "@DATA@/prosody.log" }   -- as quiet as mlink at "warning"

modules_enabled = {
	"roster"; "saslauth"; "tls"; "disco"; "carbons"; "blocklist"; "private";
	"ping"; "version"; "lastactivity"; "offline"; "limits"; "posix";
}
modules_disabled = { "s2s"; }
c2s_ports = { @C2S_PORT@ }
c2s_direct_tls_ports = { }
s2s_ports = { }
interfaces = { "127.0.0.1" }
-- Rate limits raised far above anything the benchmark offers.
limits = {
	c2s = { rate = "1000mb/s"; burst = "10s"; };
	c2sunauth = { rate = "1000mb/s"; burst = "10s"; };
}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_hashed"
password_hash = "SHA-256"
default_iteration_count = 4096
storage = "internal"
statistics = nil

VirtualHost "@DOMAIN@"
	ssl = { certificate = "@CERT@"; key = "@KEY@"; }

-- The multi-user chat service, as mlink's default (muc scenarios): rooms
-- are created by the first join, kept in memory only.
Component "conference.@DOMAIN@" "muc"
	muc_room_default_history_length = 20
	max_history_messages = 50
