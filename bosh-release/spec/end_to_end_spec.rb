# The rendered jobs working together with the real binaries: a registry set up by berth-registry's
# pre-start, and a staging run of the builder from the bundle berth-lifecycle's pre-start made.
require 'base64'
require 'net/http'
require_relative 'spec_helper'

RSpec.describe 'berth-registry and berth-lifecycle, end to end' do
  let(:root) { tmp }
  let(:port) { free_port }
  let(:tls) { BerthSpec.tls }
  let(:admin_password) { SecureRandom.hex(12) }
  let(:robot_password) { SecureRandom.hex(12) }
  let(:app_guid) { SecureRandom.uuid }
  let(:host) { "127.0.0.1:#{port}" }
  let(:certs) { File.join(root, 'certs') }
  let(:registry_properties) do
    { 'berth' => {
      'registry' => { 'listen_address' => '127.0.0.1', 'port' => port, 'external_name' => '127.0.0.1', 'tls' => tls,
                      'auth' => { 'users' => [{ 'name' => 'admin', 'password' => admin_password }], 'admins' => ['user:admin'] } },
      'cache' => { 'robot_password' => robot_password }
    } }
  end
  let(:package) { install_package(root) }
  let(:log) { File.join(root, 'berth-registry.log') }

  before do
    %w[skopeo python3 tar].each { |tool| BerthSpec.tool(tool) }
    FileUtils.mkdir_p(certs)
    File.write(File.join(certs, 'ca.crt'), tls['ca'])
  end

  after do
    (@registries || []).each do |pid|
      Process.kill('TERM', pid)
      Process.wait(pid)
    rescue Errno::ESRCH, Errno::ECHILD
      nil
    end
  end

  def start_registry
    @registry = run_registry(root, registry_properties, { 'persistent_disk' => 1024 }, port: port, log: log)
  end

  # Sets berth-registry up under `at` as on a VM (its pre-start included), serves it and waits
  # until it is healthy; its pid.
  def run_registry(at, properties, spec, port:, log:, links: {})
    registry_pre_start(at, properties: properties, spec: spec, links: links)
    pid = spawn(BerthSpec.binary('BERTH_REGISTRY_BIN'), 'serve', '--config',
                "#{at}/jobs/berth-registry/config/berth-registry.yml", %i[out err] => log)
    (@registries ||= []) << pid
    wait_for_health(pid, port, log)
    pid
  end

  def wait_for_health(pid, port, log)
    http = Net::HTTP.new('127.0.0.1', port)
    http.use_ssl = true
    http.ca_file = File.join(certs, 'ca.crt')
    deadline = Time.now + 30
    loop do
      raise "berth-registry exited:\n#{File.read(log)}" if Process.wait(pid, Process::WNOHANG)

      begin
        return if http.request_get('/healthz').code == '200'
      rescue SystemCallError, OpenSSL::SSL::SSLError, Net::OpenTimeout
        nil
      end
      raise "berth-registry not healthy in 30 s:\n#{File.read(log)}" if Time.now > deadline

      sleep 0.2
    end
  end

  # skopeo reads credentials from a file, so no password is ever on a command line.
  def authfile(user, password, registry = host)
    path = File.join(root, "auth-#{user}-#{registry.tr(':', '-')}.json")
    File.write(path, JSON.dump('auths' => { registry => { 'auth' => Base64.strict_encode64("#{user}:#{password}") } }))
    File.chmod(0o600, path)
    path
  end

  def skopeo(*args)
    Open3.capture3('skopeo', *args)
  end

  def push_image
    image = File.join(root, 'image')
    info = File.join(root, 'image.info')
    run!({}, 'python3', File.join(BerthSpec::REPO, 'ci/bench.d/helper.py'), 'gen-image', image,
         '--layers', '2', '--layer-size', '1024', '--info', info)
    _, err, status = skopeo('copy', '--preserve-digests', '--dest-authfile', authfile('admin', admin_password),
                            '--dest-cert-dir', certs, "oci:#{image}:latest", "docker://#{host}/team/app:1")
    raise "skopeo push failed: #{err}" unless status.success?

    File.read(info)[/^manifest (sha256:\h{64})/, 1]
  end

  def repack_bundle
    source = "#{root}/packages/docker_app_lifecycle/docker_app_lifecycle.tgz"
    bundle = Dir.mktmpdir('diego-bundle', root)
    %w[builder launcher healthcheck diego-sshd].each { |entry| File.binwrite(File.join(bundle, entry), SecureRandom.random_bytes(64)) }
    FileUtils.mkdir_p(File.dirname(source))
    run!({}, 'tar', '-czf', source, '-C', bundle, 'builder', 'launcher', 'healthcheck', 'diego-sshd')
    unpacked = File.join(root, 'lifecycle')
    static = "#{root}/jobs/file_server/packages"
    install_job(root, 'berth-lifecycle',
                properties: { 'berth' => { 'lifecycle' => { 'source' => source, 'static_directory' => static, 'unpacked_at' => unpacked } } },
                links: { 'berth-registry' => provided_link('berth-registry', registry_properties) })
    run!({ 'BERTH_JOB_DIR' => "#{root}/jobs/berth-lifecycle", 'BERTH_PACKAGE_DIR' => package },
         "#{root}/jobs/berth-lifecycle/bin/pre-start")
    FileUtils.mkdir_p(unpacked)
    run!({}, 'tar', '-xzf', "#{static}/berth_docker_app_lifecycle/docker_app_lifecycle.tgz", '-C', unpacked)
    unpacked
  end

  # As Cloud Controller runs it: flags on the command line, the app's environment, the origin
  # registry's password given the way the cacher also accepts it, out of argv.
  def stage(lifecycle, reference, identity = {})
    result = File.join(root, 'result.json')
    env = { 'VCAP_APPLICATION' => JSON.dump('application_id' => app_guid), 'BERTH_CACHE' => 'true',
            'CF_DOCKER_PASSWORD' => admin_password, 'CF_SYSTEM_CERT_PATH' => certs, 'BERTH_CACHER_CONFIG' => nil,
            'CF_INSTANCE_CERT' => nil, 'CF_INSTANCE_KEY' => nil, 'NO_PROXY' => '127.0.0.1', 'no_proxy' => '127.0.0.1' }
      .merge(identity)
    out, err, status = Open3.capture3(env, File.join(lifecycle, 'builder'), "-outputMetadataJSONFilename=#{result}",
                                      "-dockerRef=#{reference}", '-dockerUser=admin')
    [out + err, status, status.success? ? JSON.parse(File.read(result)) : nil]
  end

  it 'caches an image into cache/<app guid>/<id> with the robot and pins the result to its digest' do
    start_registry
    digest = push_image
    lifecycle = repack_bundle

    output, status, result = stage(lifecycle, "#{host}/team/app:1")
    expect(status).to be_success, output
    expect(result['lifecycle_type']).to eq('docker')
    image = result['lifecycle_metadata']['docker_image']
    expect(image).to match(%r{\A#{Regexp.escape(host)}/cache/#{app_guid}/\h+@#{digest}\z})
    expect(JSON.parse(result['execution_metadata'])['cmd']).to eq(['/bin/true'])

    # Cells pull it anonymously, or with credentials of the origin registry, by its exact name.
    _, err, anonymous = skopeo('inspect', '--raw', '--no-creds', '--cert-dir', certs, "docker://#{image}")
    expect(anonymous).to be_success, err
    _, err, foreign = skopeo('inspect', '--raw', '--authfile', authfile('someone', 'origin-password'), '--cert-dir', certs,
                             "docker://#{image}")
    expect(foreign).to be_success, err
    _, refusal, listed = skopeo('list-tags', '--no-creds', '--cert-dir', certs, "docker://#{image.split('@').first}")
    expect(listed).not_to be_success
    expect(refusal).to match(/unauthorized|authentication required|denied/i)

    # The robot may push into the cache namespace and nowhere else.
    _, refused_push, elsewhere = skopeo('copy', '--dest-authfile', authfile('robot$berth-cacher', robot_password), '--dest-cert-dir', certs,
                             "oci:#{root}/image:latest", "docker://#{host}/team/robot-was-here:1")
    expect(elsewhere).not_to be_success
    expect(refused_push).to match(/unauthorized|authentication required|denied/i)

    expect(output + File.read(log)).not_to include(admin_password, robot_password)
  end

  it "tells BOSH DNS the instance is healthy while the registry serves, and not once it has stopped" do
    BerthSpec.tool('curl')
    start_registry
    healthy = "#{root}/jobs/berth-registry/bin/dns/healthy"
    _, status = Open3.capture2e(healthy)
    expect(status).to be_success
    Process.kill('TERM', @registry)
    Process.wait(@registry)
    _, status = Open3.capture2e(healthy)
    expect(status).not_to be_success
  end

  it 'collects garbage with the berth-registry-gc errand while the registry serves' do
    start_registry
    push_image
    config = "#{root}/jobs/berth-registry/config/berth-registry.yml"
    errand = lambda do |dry_run|
      install_job(root, 'berth-registry-gc', properties: { 'berth' => { 'gc' => { 'dry_run' => dry_run } } })
      run!({ 'BERTH_REGISTRY_CONFIG' => config, 'BERTH_PACKAGE_DIR' => package }, "#{root}/jobs/berth-registry-gc/bin/run")
    end
    expect(errand.call(true)).to match(/\Awould delete 0 untagged manifests and 0 objects, 0 bytes, in \d+ ms; retention: 0 stagings/)
    expect(errand.call(false)).to match(/\Adeleted 0 untagged manifests and 0 objects, 0 bytes, in \d+ ms; retention: 0 stagings/)
    expect(File.read(log)).to include('garbage collection done')
    # The image is still whole.
    _, err, status = skopeo('inspect', '--raw', '--authfile', authfile('admin', admin_password), '--cert-dir', certs,
                            "docker://#{host}/team/app:1")
    expect(status).to be_success, err
  end

  it 'stages uncached, not silently, when the registry refuses the robot' do
    start_registry
    push_image
    registry_properties['berth']['cache']['robot_password'] = 'not-the-password'
    lifecycle = repack_bundle

    output, status, result = stage(lifecycle, "#{host}/team/app:1")
    expect(status).to be_success, output
    expect(result['lifecycle_metadata']['docker_image']).to eq("#{host}/team/app:1")
    expect(output).to match(/Warning: the image is not cached: .*refused the cacher's credentials/)
    expect(output).not_to include('not-the-password', admin_password)
  end

  it 'fails the staging, not silently, when the registry refuses the robot and on_cache_failure is fail' do
    start_registry
    push_image
    registry_properties['berth']['cache']['robot_password'] = 'not-the-password'
    lifecycle = repack_bundle
    config = File.join(lifecycle, 'berth-cacher.yml')
    File.write(config, File.read(config).sub('on_cache_failure: stage-uncached', 'on_cache_failure: fail'))

    output, status, = stage(lifecycle, "#{host}/team/app:1")
    expect(status.exitstatus).to eq(2), output
    expect(output).not_to include('not-the-password', admin_password)
  end

  context 'with instance identity, as the cf-deployment ops file sets it up' do
    let(:identity_ca) { BerthSpec.instance_identity_ca }
    let(:registry_properties) do
      { 'berth' => {
        'registry' => { 'listen_address' => '127.0.0.1', 'port' => port, 'external_name' => '127.0.0.1', 'tls' => tls,
                        'auth' => { 'users' => [{ 'name' => 'admin', 'password' => admin_password }], 'admins' => ['user:admin'] } },
        'cache' => { 'instance_identity' => { 'ca_certificates' => [identity_ca['certificate'], identity_ca['ca']] } }
      } }
    end

    # A cert dir as containers/image reads it: the registry's CA, and the container's instance
    # identity as its client certificate.
    def client_cert_dir(identity)
      dir = File.join(root, 'client-certs')
      FileUtils.mkdir_p(dir)
      FileUtils.cp(File.join(certs, 'ca.crt'), dir)
      FileUtils.cp(identity['CF_INSTANCE_CERT'], File.join(dir, 'client.cert'))
      FileUtils.cp(identity['CF_INSTANCE_KEY'], File.join(dir, 'client.key'))
      dir
    end

    it "caches into cache/<app guid>/<id> with the staging container's certificate, from a bundle with no secret" do
      start_registry
      digest = push_image
      lifecycle = repack_bundle
      shipped = File.read(File.join(lifecycle, 'berth-cacher.yml'))
      expect(YAML.safe_load(shipped)['registry']).to include('identity' => 'instance')
      expect(shipped).not_to match(/password|username|robot|repository_key|PRIVATE KEY/)
      expect(File.read("#{root}/data/berth-registry/htpasswd")).not_to include('robot')

      identity = BerthSpec.instance_identity(root, app_guid)
      output, status, result = stage(lifecycle, "#{host}/team/app:1", identity)
      expect(status).to be_success, output
      image = result['lifecycle_metadata']['docker_image']
      expect(image).to match(%r{\A#{Regexp.escape(host)}/cache/#{app_guid}/\h+@#{digest}\z})

      # Cells pull it anonymously, or with credentials of the origin registry, by its exact name.
      _, err, anonymous = skopeo('inspect', '--raw', '--no-creds', '--cert-dir', certs, "docker://#{image}")
      expect(anonymous).to be_success, err
      _, err, foreign = skopeo('inspect', '--raw', '--authfile', authfile('someone', 'origin-password'), '--cert-dir', certs,
                               "docker://#{image}")
      expect(foreign).to be_success, err

      # The app's certificate opens its own cache to it, and nothing else.
      cert_dir = client_cert_dir(identity)
      other_app = SecureRandom.uuid
      _, err, own = skopeo('copy', '--dest-cert-dir', cert_dir, "oci:#{root}/image:latest", "docker://#{host}/cache/#{app_guid}/again:1")
      expect(own).to be_success, err
      ["cache/#{other_app}/x:1", 'team/app-was-here:1'].each do |target|
        _, refusal, pushed = skopeo('copy', '--dest-cert-dir', cert_dir, "oci:#{root}/image:latest", "docker://#{host}/#{target}")
        expect(pushed).not_to be_success, target
        expect(refusal).to match(/unauthorized|authentication required|denied/i)
      end
      _, refusal, listed = skopeo('list-tags', '--cert-dir', cert_dir, "docker://#{image.split('@').first}")
      expect(listed).not_to be_success
      expect(refusal).to match(/unauthorized|authentication required|denied/i)

      expect(output + File.read(log)).not_to include(admin_password)
    end

    it 'stages uncached, not silently, without a certificate to present' do
      start_registry
      push_image
      lifecycle = repack_bundle

      output, status, result = stage(lifecycle, "#{host}/team/app:1")
      expect(status).to be_success, output
      expect(result['lifecycle_metadata']['docker_image']).to eq("#{host}/team/app:1")
      expect(output).to include('Warning', 'CF_INSTANCE_CERT')
    end
  end

  context "with the blobs on a WebDAV server set up as capi's blobstore job sets up nginx" do
    let(:dav_port) { free_port }
    let(:dav_dir) { File.join(root, 'nginx') }
    let(:shared) { File.join(root, 'store-shared') }
    let(:dav_password) { SecureRandom.hex(12) }
    # The folder berth-registry-ha.yml puts the blobs in on cf-deployment's blobstore, here.
    let(:dav_url) do
      ops = YAML.safe_load(File.read(File.join(BerthSpec::REPO, 'manifests/operations/berth-registry-ha.yml')))
      url = ops.find { |op| op['path'].end_with?('/berth/registry/storage?') }.fetch('value').fetch('webdav').fetch('url')
      "https://127.0.0.1:#{dav_port}#{URI(url).path}"
    end
    let(:registry_properties) do
      super().tap do |properties|
        properties['berth']['registry']['storage'] = {
          'backend' => 'webdav',
          'webdav' => { 'url' => dav_url, 'username' => 'blobstore-user', 'password' => dav_password, 'ca' => tls['ca'] }
        }
      end
    end

    # The internal server of capi's blobstore.conf: TLS, and under /admin/ basic auth against
    # the admin users, WebDAV PUT (creating folders), DELETE, COPY and PROPFIND over the shared
    # store (no MKCOL, no MOVE).
    before do
      BerthSpec.tool('nginx')
      FileUtils.mkdir_p([dav_dir, shared])
      File.write("#{dav_dir}/tls.crt", tls['certificate'])
      File.write("#{dav_dir}/tls.key", tls['private_key'])
      File.write("#{dav_dir}/write_users", "blobstore-user:{PLAIN}#{dav_password}\n")
      File.write("#{dav_dir}/nginx.conf", <<~CONF)
        #{"user #{owner};" if Process.uid.zero?}
        load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
        worker_processes 1;
        pid #{dav_dir}/nginx.pid;
        error_log #{dav_dir}/error.log;
        events { worker_connections 64; }
        http {
          access_log off;
          client_body_temp_path #{dav_dir}/body;
          proxy_temp_path #{dav_dir}/proxy;
          fastcgi_temp_path #{dav_dir}/fastcgi;
          uwsgi_temp_path #{dav_dir}/uwsgi;
          scgi_temp_path #{dav_dir}/scgi;
          server {
            listen 127.0.0.1:#{dav_port} ssl;
            ssl_certificate #{dav_dir}/tls.crt;
            ssl_certificate_key #{dav_dir}/tls.key;
            root #{shared}/;
            client_max_body_size 0;
            location /admin/ {
              auth_basic "Blobstore Admin";
              auth_basic_user_file #{dav_dir}/write_users;
              dav_methods DELETE PUT COPY;
              dav_ext_methods PROPFIND;
              create_full_put_path on;
              alias #{shared}/;
            }
          }
        }
      CONF
      @nginx = spawn('nginx', '-p', dav_dir, '-c', "#{dav_dir}/nginx.conf", '-g', 'daemon off;', %i[out err] => "#{dav_dir}/stderr.log")
      deadline = Time.now + 10
      until File.exist?("#{dav_dir}/nginx.pid")
        raise "nginx exited:\n#{File.read("#{dav_dir}/stderr.log")}" if Process.wait(@nginx, Process::WNOHANG)
        raise 'nginx did not start in 10 s' if Time.now > deadline

        sleep 0.1
      end
    end

    after do
      Process.kill('TERM', @nginx)
      Process.wait(@nginx)
    end

    it 'keeps what is pushed in the blobstore folder, behind its basic auth, and serves it back' do
      start_registry
      digest = push_image
      _, err, pulled = skopeo('copy', '--preserve-digests', '--src-authfile', authfile('admin', admin_password), '--src-cert-dir', certs,
                              "docker://#{host}/team/app:1", "oci:#{root}/pulled:1")
      expect(pulled).to be_success, err
      expect(File.read("#{root}/pulled/index.json")).to include(digest)

      folder = File.join(shared, URI(dav_url).path.delete_prefix('/admin/'))
      stored = Dir.glob('**/*', base: folder).select { |f| File.file?(File.join(folder, f)) }
      expect(stored).not_to be_empty
      anonymous, = Open3.capture2('curl', '--silent', '--output', '/dev/null', '--write-out', '%{http_code}', '--cacert',
                                  File.join(certs, 'ca.crt'), "#{dav_url}/#{stored.first}")
      expect(anonymous).to eq('401')
    end

    # The test servers' MariaDB (ci/test starts them), a database of this example's own on it.
    context 'and two instances with their metadata in MySQL, as berth-registry-ha.yml deploys them' do
      let(:mysql) do
        url = ENV.fetch('BERTH_TEST_MYSQL', '')
        raise 'set BERTH_TEST_MYSQL to a MySQL server (ci/test starts one: target/debug/test-services)' if url.empty?

        URI(url)
      end
      let(:database) { "berth_#{SecureRandom.hex(8)}" }
      let(:signing_key) { OpenSSL::PKey::EC.generate('prime256v1').private_to_pem }
      let(:ports) { [port, free_port] }
      let(:peers) { { 'peers' => { 'instances' => ports.each_index.map { |i| { 'index' => i, 'address' => "b#{i}.example" } } } } }
      let(:instance_properties) do
        registry_properties.tap do |properties|
          registry = properties['berth']['registry']
          registry['database'] = { 'type' => 'mysql', 'host' => mysql.host, 'port' => mysql.port, 'name' => database,
                                   'username' => mysql.user, 'password' => mysql.password, 'tls' => { 'mode' => 'disable' } }
          registry['auth']['token'] = { 'signing_key' => signing_key }
        end
      end

      def sql(statement)
        run!({ 'MYSQL_PWD' => mysql.password }, 'mariadb', '--no-defaults', '-h', mysql.host, '-P', mysql.port.to_s,
             '-u', mysql.user, '-e', statement)
      end

      before { sql("CREATE DATABASE #{database}") }
      after { sql("DROP DATABASE #{database}") }

      def token_from(port)
        http = Net::HTTP.new('127.0.0.1', port)
        http.use_ssl = true
        http.ca_file = File.join(certs, 'ca.crt')
        request = Net::HTTP::Get.new('/auth/token?service=berth-registry&scope=repository:team/app:pull')
        request.basic_auth('admin', admin_password)
        JSON.parse(http.request(request).body).fetch('token')
      end

      it 'serves through either what was pushed through the other, and honours the tokens the other issued' do
        ports.each_with_index do |instance_port, i|
          properties = Marshal.load(Marshal.dump(instance_properties))
          properties['berth']['registry']['port'] = instance_port
          at = File.join(root, "instance-#{i}")
          run_registry(at, properties, { 'persistent_disk' => 0 }, port: instance_port, log: File.join(root, "instance-#{i}.log"),
                                                                   links: peers)
        end
        digest = push_image
        other = "127.0.0.1:#{ports[1]}"
        _, err, pulled = skopeo('copy', '--preserve-digests', '--src-authfile', authfile('admin', admin_password, other),
                                '--src-cert-dir', certs, "docker://#{other}/team/app:1", "oci:#{root}/pulled:1")
        expect(pulled).to be_success, err
        expect(File.read("#{root}/pulled/index.json")).to include(digest)

        http = Net::HTTP.new('127.0.0.1', ports[1])
        http.use_ssl = true
        http.ca_file = File.join(certs, 'ca.crt')
        request = Net::HTTP::Head.new('/v2/team/app/manifests/1')
        request['Authorization'] = "Bearer #{token_from(ports[0])}"
        request['Accept'] = 'application/vnd.oci.image.manifest.v1+json'
        response = http.request(request)
        expect(response.code).to eq('200')
        expect(response['Docker-Content-Digest']).to eq(digest)
      end
    end
  end
end
