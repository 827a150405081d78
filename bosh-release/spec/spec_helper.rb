# What the release's specs share: the renderer, the binaries under test, temp dirs, TLS material
# and a VM's /var/vcap laid out under a temp dir.
require 'etc'
require 'fileutils'
require 'json'
require 'open3'
require 'openssl'
require 'securerandom'
require 'socket'
require 'tmpdir'
require 'yaml'
require_relative '../lib/job_template'
require_relative 'support/go_patch'

module BerthSpec
  REPO = File.expand_path('../..', __dir__)

  # The binaries are never skipped: a missing one fails the run with the variable to set.
  def self.binary(variable)
    path = ENV.fetch(variable, '')
    raise "set #{variable} to the binary under test (ci/test uses target/debug)" if path.empty?
    raise "#{variable}=#{path} is not an executable file" unless File.file?(path) && File.executable?(path)

    File.expand_path(path)
  end

  def self.tool(name)
    found = ENV.fetch('PATH', '').split(File::PATH_SEPARATOR).map { |d| File.join(d, name) }
                .find { |p| File.file?(p) && File.executable?(p) }
    found or raise "#{name} is required by the release's specs (ci/install-deps installs it)"
  end

  # One CA and a server certificate for 127.0.0.1, made once per run.
  def self.tls
    @tls ||= begin
      ca_key = OpenSSL::PKey::EC.generate('prime256v1')
      ca = certificate('CN=berth-spec-ca', ca_key, ca_key, nil, [
                         ['basicConstraints', 'CA:TRUE', true], ['keyUsage', 'keyCertSign,cRLSign', true]
                       ])
      key = OpenSSL::PKey::EC.generate('prime256v1')
      leaf = certificate('CN=127.0.0.1', key, ca_key, ca, [
                           ['basicConstraints', 'CA:FALSE', true], ['keyUsage', 'digitalSignature', true],
                           ['extendedKeyUsage', 'serverAuth', false],
                           ['subjectAltName', 'IP:127.0.0.1,DNS:localhost', false]
                         ])
      { 'ca' => ca.to_pem, 'certificate' => leaf.to_pem, 'private_key' => key.private_to_pem }
    end
  end

  # Diego's instance identity CA as cf-deployment generates it (diego_instance_identity_ca, signed
  # by application_ca), as a CredHub certificate variable: certificate, ca, private_key.
  def self.instance_identity_ca
    @instance_identity_ca ||= begin
      ca_extensions = [['basicConstraints', 'CA:TRUE', true], ['keyUsage', 'keyCertSign,cRLSign', true]]
      root_key = OpenSSL::PKey::RSA.new(2048)
      root = certificate('/CN=appRootCA', root_key, root_key, nil, ca_extensions)
      key = OpenSSL::PKey::RSA.new(2048)
      ca = certificate('/CN=instanceIdentityCA', key, root_key, root, ca_extensions)
      { 'certificate' => ca.to_pem, 'ca' => root.to_pem, 'private_key' => key.to_pem }
    end
  end

  # What the rep gives a staging container of app `app_guid`: the CF_INSTANCE_CERT file (the leaf
  # with the OUs Cloud Controller asks for, then the instance identity CA) and the CF_INSTANCE_KEY
  # file (an RSA key in PKCS#1), written into `dir`.
  def self.instance_identity(dir, app_guid)
    ca = instance_identity_ca
    key = OpenSSL::PKey::RSA.new(2048)
    subject = "/CN=#{SecureRandom.uuid}/OU=organization:#{SecureRandom.uuid}/OU=space:#{SecureRandom.uuid}/OU=app:#{app_guid}"
    leaf = certificate(subject, key, OpenSSL::PKey::RSA.new(ca['private_key']), OpenSSL::X509::Certificate.new(ca['certificate']), [
                         ['basicConstraints', 'CA:FALSE', true],
                         ['keyUsage', 'digitalSignature,keyEncipherment,keyAgreement', true],
                         ['extendedKeyUsage', 'clientAuth,serverAuth', false]
                       ])
    files = { 'CF_INSTANCE_CERT' => File.join(dir, 'instance.crt'), 'CF_INSTANCE_KEY' => File.join(dir, 'instance.key') }
    File.write(files['CF_INSTANCE_CERT'], leaf.to_pem + ca['certificate'])
    File.write(files['CF_INSTANCE_KEY'], key.to_pem)
    files
  end

  def self.certificate(subject, key, signing_key, issuer, extensions)
    cert = OpenSSL::X509::Certificate.new
    cert.version = 2
    cert.serial = SecureRandom.random_number(2**64)
    cert.subject = OpenSSL::X509::Name.parse(subject)
    cert.issuer = issuer ? issuer.subject : cert.subject
    cert.public_key = key
    cert.not_before = Time.now - 60
    cert.not_after = Time.now + 86_400
    factory = OpenSSL::X509::ExtensionFactory.new(issuer || cert, cert)
    extensions.each { |name, value, critical| cert.add_extension(factory.create_extension(name, value, critical)) }
    cert.sign(signing_key, OpenSSL::Digest.new('SHA256'))
    cert
  end

  module Helpers
    def release_job(name)
      JobTemplate::Job.new(File.join(REPO, 'jobs', name))
    end

    def tmp
      @tmp ||= Dir.mktmpdir('berth-spec')
    end

    def free_port
      server = TCPServer.new('127.0.0.1', 0)
      server.addr[1]
    ensure
      server&.close
    end

    # Renders every template of a job into root/jobs/NAME as the agent would on a VM and returns
    # the rendered texts by path. Scripts are installed as rendered (their paths are overridden
    # through the environment); in configuration files each /var/vcap path moves under root.
    def install_job(root, name, **render)
      job = release_job(name)
      job.templates.values.to_h do |path|
        text = job.render(path, **render)
        script = path.start_with?('bin/')
        destination = File.join(root, 'jobs', name, path)
        FileUtils.mkdir_p(File.dirname(destination))
        File.write(destination, script ? text : text.gsub('/var/vcap/', "#{root}/"))
        File.chmod(script ? 0o755 : 0o644, destination)
        [path, text]
      end
    end

    # Installs berth-registry rendered with `render` under root and runs its pre-start, which ends
    # with the real binary's `config check`; its output.
    def registry_pre_start(root, **render)
      install_job(root, 'berth-registry', **render)
      run!({ 'BERTH_JOB_DIR' => "#{root}/jobs/berth-registry", 'BERTH_DATA_DIR' => "#{root}/data/berth-registry",
             'BERTH_PACKAGE_DIR' => install_package(root), 'BERTH_OWNER' => owner },
           "#{root}/jobs/berth-registry/bin/pre-start")
    end

    # The berth package as installed on a VM, its binaries being the ones under test.
    def install_package(root)
      bin = File.join(root, 'packages', 'berth', 'bin')
      FileUtils.mkdir_p(bin)
      { 'berth-registry' => 'BERTH_REGISTRY_BIN', 'berth-cacher' => 'BERTH_CACHER_BIN' }.each do |name, variable|
        FileUtils.ln_sf(BerthSpec.binary(variable), File.join(bin, name))
      end
      File.join(root, 'packages', 'berth')
    end

    # The link a job provides, as the director computes it: each property the job's spec lists
    # under `provides` is looked up in the job's manifest properties as written, before any
    # ((variable)) is interpolated, key by key with Hash#key?, so that a ((variable)) standing where
    # a hash is needed fails here as it fails a deploy (cloudfoundry/bosh#2250); a property not set
    # takes its spec default, or nil. Consumers see the values interpolated, so `vars` are applied
    # to the result.
    def provided_link(name, raw_properties, vars = {}, address: "q-s0.#{name}.default.my-deployment.bosh")
      spec = release_job(name).spec
      declared = spec.fetch('properties')
      nested = {}
      spec.fetch('provides').first.fetch('properties').each do |property|
        path = property.split('.')
        found, value = raw_property(raw_properties, path)
        unless found
          raise "link property #{property} of #{name} is not declared in its spec" unless declared.key?(property)

          value = declared.fetch(property)&.fetch('default', nil)
        end
        *parents, leaf = path
        parents.reduce(nested) { |node, key| node[key] ||= {} }[leaf] = value
      end
      { 'properties' => interpolate(nested, vars), 'address' => address }
    end

    # Deliberately not guarded by is_a?(Hash): a String answers key? with NoMethodError, as in the director.
    def raw_property(node, path)
      path.each do |key|
        return [false, nil] if node.nil? || !node.key?(key)

        node = node[key]
      end
      [true, node]
    end

    # Replaces ((name)) and ((name.key)) as the director does with values from `vars`.
    def interpolate(node, vars)
      case node
      when Hash then node.transform_values { |value| interpolate(value, vars) }
      when Array then node.map { |value| interpolate(value, vars) }
      when /\A\(\(([\w.-]+)\)\)\z/ then lookup_var(vars, Regexp.last_match(1))
      when String then node.gsub(/\(\(([\w.-]+)\)\)/) { lookup_var(vars, Regexp.last_match(1)).to_s }
      else node
      end
    end

    def lookup_var(vars, name)
      name.split('.').reduce(vars) { |node, key| node.fetch(key) { raise "no value for variable ((#{name}))" } }
    end

    def run!(env, *command, stdin: '')
      out, err, status = Open3.capture3(env, *command, stdin_data: stdin)
      raise "#{command.first} failed (#{status}):\n#{out}#{err}" unless status.success?

      out + err
    end

    def owner
      Etc.getpwuid(Process.uid).name
    end
  end
end

RSpec.configure do |config|
  config.include BerthSpec::Helpers
  config.after { FileUtils.rm_rf(@tmp) if @tmp }
  config.expect_with(:rspec) { |c| c.max_formatted_output_length = 2000 }
end
